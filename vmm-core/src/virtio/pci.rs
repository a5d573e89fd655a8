//! The virtio-pci modern transport (virtio 1.2 §4.1) with MSI-X.
//!
//! One 64-bit memory BAR0 holds every region (the layout cloud-hypervisor and
//! `reference/protocols-crates.md` §5.2 use):
//!
//! | offset | region | |
//! |---|---|---|
//! | 0x0000 | common config | feature windows, status, queue setup |
//! | 0x2000 | ISR status | read-to-clear; only meaningful for INTx, which is not routed |
//! | 0x4000 | device config | served from the backend's cached config space |
//! | 0x6000 | notify | one dword per queue (`notify_off_multiplier` 4), each a KVM ioeventfd |
//! | 0x8000 | MSI-X table | 16 bytes per vector: num_queues + 1 vectors |
//! | 0x9000 | MSI-X PBA | |
//!
//! Vendor capabilities of type COMMON, NOTIFY, ISR, DEVICE and PCI_CFG (the config-space
//! access window) point into it, followed by the MSI-X capability.
//!
//! Interrupts: each MSI-X vector owns an eventfd and a GSI. While the vector may deliver (MSI-X
//! enabled, function and vector unmasked) the eventfd is a KVM irqfd on that GSI, whose MSI
//! route carries the guest-programmed address/data; while masked, the irqfd is unregistered,
//! so signals accumulate in the eventfd: the PBA reports them and KVM injects them when the
//! irqfd comes back. Queue `q`'s backend `call` is the eventfd of its `queue_msix_vector`.
//!
//! Device lifecycle: at DRIVER_OK the enabled queues are handed to the [`VirtioBackend`]; a
//! status write of 0 stops the backend and resets the transport (the MSI-X table is PCI
//! function state and stays). Backend errors never reach the vCPU: they are logged and set
//! `DEVICE_NEEDS_RESET`.

#![forbid(unsafe_code)]

use super::msix::MsixTable;
use super::{ActiveQueue, QueueConfig, VIRTIO_F_VERSION_1, VirtioBackend, VmEventFds, status};
use crate::devices::pci::{BarKind, PciConfiguration, PciDevice, PciError, PciHeader};
use crate::irq_routing::{GsiRouter, IrqRoutingError};
use std::sync::Arc;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// PCI vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Modern-only devices have revision 1 or higher.
pub const VIRTIO_PCI_REVISION: u8 = 1;

/// BAR0's size and the regions in it.
pub const BAR0_SIZE: u64 = 0x1_0000;
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_OFFSET: u64 = 0x4000;
pub const NOTIFY_OFFSET: u64 = 0x6000;
pub const MSIX_TABLE_OFFSET: u64 = 0x8000;
pub const MSIX_PBA_OFFSET: u64 = 0x9000;
/// Every region is this long (what each capability's `length` says).
pub const REGION_LEN: u64 = 0x1000;
/// Queue `q` is notified at `NOTIFY_OFFSET + q * NOTIFY_OFF_MULTIPLIER`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// "No MSI-X vector" in `msix_config` / `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;
/// Most queues the layout holds: one MSI-X table entry each plus the config vector in
/// `REGION_LEN`.
pub const MAX_QUEUES: usize = 255;

/// Vendor-specific capability id and the virtio `cfg_type`s.
const PCI_CAP_ID_VNDR: u8 = 0x09;
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
/// `struct virtio_pci_cap` is 16 bytes; the notify and PCI_CFG capabilities add a dword.
const VIRTIO_PCI_CAP_LEN: usize = 16;
const VIRTIO_PCI_CAP_EXT_LEN: usize = 20;

/// ISR status bits.
const ISR_CONFIG: u8 = 0x2;

/// `struct virtio_pci_common_cfg` fields (byte offsets).
mod common {
    pub const DEVICE_FEATURE_SELECT: usize = 0x00;
    pub const DEVICE_FEATURE: usize = 0x04;
    pub const DRIVER_FEATURE_SELECT: usize = 0x08;
    pub const DRIVER_FEATURE: usize = 0x0c;
    pub const MSIX_CONFIG: usize = 0x10;
    pub const NUM_QUEUES: usize = 0x12;
    pub const DEVICE_STATUS: usize = 0x14;
    pub const CONFIG_GENERATION: usize = 0x15;
    pub const QUEUE_SELECT: usize = 0x16;
    pub const QUEUE_SIZE: usize = 0x18;
    pub const QUEUE_MSIX_VECTOR: usize = 0x1a;
    pub const QUEUE_ENABLE: usize = 0x1c;
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
    pub const QUEUE_DESC: usize = 0x20;
    pub const QUEUE_DRIVER: usize = 0x28;
    pub const QUEUE_DEVICE: usize = 0x30;
    /// queue_notify_data, queue_reset and the admin-queue fields follow and read 0 (their
    /// features are not offered).
    pub const LEN: usize = 0x40;
}

/// Feature bits the transport can offer: device-specific bits (0..=23, 50..=63) and, of the
/// reserved range, INDIRECT_DESC (28), EVENT_IDX (29) and VERSION_1 (32). Not offered:
/// vhost-user's PROTOCOL_FEATURES (30, a protocol bit), ACCESS_PLATFORM (no IOMMU), RING_PACKED
/// and IN_ORDER (recovery relies on split rings completed in order), NOTIFICATION_DATA,
/// RING_RESET, ADMIN_VQ and the rest this transport does not implement.
pub const TRANSPORT_FEATURE_MASK: u64 =
    0x00ff_ffff | (!0u64 << 50) | (1 << 28) | (1 << 29) | (1 << VIRTIO_F_VERSION_1);

/// Errors of building or placing a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0} queues do not fit the transport (1..={MAX_QUEUES})")]
    QueueCount(usize),
    #[error("the device does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    #[error("cannot lay out the PCI config space")]
    Pci(#[from] PciError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot allocate a GSI for MSI-X vector {vector}")]
    Gsi {
        vector: usize,
        #[source]
        source: IrqRoutingError,
    },
    #[error("cannot register the notify ioeventfd of queue {queue} at {addr:#x}")]
    Ioevent {
        queue: usize,
        addr: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Who the device is on the PCI bus.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Name in logs, e.g. `virtio-blk disk0`.
    pub label: String,
    /// virtio device type (2 = block, 1 = net).
    pub device_type: u16,
    /// PCI base class and subclass.
    pub class: u8,
    pub subclass: u8,
}

/// One queue's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct QueueRegs {
    max: u16,
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueRegs {
    fn new(max: u16) -> Self {
        Self {
            max,
            size: max,
            vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// One MSI-X vector: its eventfd and GSI, and whether the eventfd is an irqfd right now.
struct Vector {
    call: EventFd,
    gsi: u32,
    registered: bool,
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice<B: VirtioBackend> {
    label: String,
    config: PciConfiguration,
    backend: B,
    vm: Arc<dyn VmEventFds>,
    router: Arc<GsiRouter>,

    /// Feature bits offered to the driver.
    offered: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    msix_config: u16,
    device_status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    isr: u8,
    /// The backend was handed the queues (successfully or not) since the last reset.
    backend_started: bool,

    kicks: Vec<EventFd>,
    /// The BAR0 address the notify ioeventfds are registered at.
    notify_bar: Option<u64>,
    msix: MsixTable,
    vectors: Vec<Vector>,
    /// The call eventfd of queues without an MSI-X vector: nobody reads it.
    unrouted_call: EventFd,
    msix_cap: usize,
    pci_cfg_cap: usize,
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() {
        VIRTIO_PCI_CAP_EXT_LEN
    } else {
        VIRTIO_PCI_CAP_LEN
    };
    let mut cap = vec![0u8; len];
    cap[0] = PCI_CAP_ID_VNDR;
    cap[2] = u8::try_from(len).expect("capability length fits a byte");
    cap[3] = cfg_type;
    cap[4] = 0; // BAR 0
    let offset = u32::try_from(offset).expect("BAR0 offsets fit 32 bits");
    let length = u32::try_from(length).expect("region lengths fit 32 bits");
    cap[8..12].copy_from_slice(&offset.to_le_bytes());
    cap[12..16].copy_from_slice(&length.to_le_bytes());
    if let Some(extra) = extra {
        cap[16..20].copy_from_slice(&extra.to_le_bytes());
    }
    cap
}

fn put(img: &mut [u8], at: usize, bytes: &[u8]) {
    img[at..at + bytes.len()].copy_from_slice(bytes);
}

fn get_u16(img: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([img[at], img[at + 1]])
}

fn get_u32(img: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(img[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(img: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(img[at..at + 8].try_into().expect("8 bytes"))
}

fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked to 32 bits")
}

fn high32(v: u64) -> u32 {
    u32::try_from(v >> 32).expect("shifted to 32 bits")
}

/// Whether `evt` has a count. Only used for vectors whose irqfd is unregistered, so nothing
/// else consumes the eventfd: the count is read and written back.
fn eventfd_pending(evt: &EventFd) -> bool {
    match evt.read() {
        Ok(n) => {
            // Writing back what was just read cannot overflow the counter.
            let _ = evt.write(n);
            true
        }
        Err(_) => false,
    }
}

/// The guest address of queue `q`'s notify dword when BAR0 is at `bar`.
pub fn notify_address(bar: u64, queue: usize) -> u64 {
    let q = u64::try_from(queue).expect("queue index fits 64 bits");
    bar + NOTIFY_OFFSET + q * u64::from(NOTIFY_OFF_MULTIPLIER)
}

impl<B: VirtioBackend> VirtioPciDevice<B> {
    /// A transport for `backend`: builds the config space (ids, BAR0, capabilities), the kick
    /// and call eventfds, and one GSI per MSI-X vector. Place it with
    /// [`PciRoot::add_device`](crate::devices::PciRoot::add_device), then call
    /// [`register_notifiers`](Self::register_notifiers).
    pub fn new(
        info: &DeviceInfo,
        backend: B,
        vm: Arc<dyn VmEventFds>,
        router: Arc<GsiRouter>,
    ) -> Result<Self, TransportError> {
        let num_queues = backend.num_queues();
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(TransportError::QueueCount(num_queues));
        }
        let features = backend.device_features();
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(TransportError::NoVersion1(features));
        }
        let num_vectors = u16::try_from(num_queues + 1).expect("at most 256 vectors");
        let msix = MsixTable::new(num_vectors);

        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + info.device_type,
            revision_id: VIRTIO_PCI_REVISION,
            class: info.class,
            subclass: info.subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: info.device_type,
        });
        config.add_bar(
            0,
            BAR0_SIZE,
            BarKind::Memory64 {
                prefetchable: false,
            },
        )?;
        config.add_capability(&vendor_cap(
            VIRTIO_PCI_CAP_COMMON_CFG,
            COMMON_CFG_OFFSET,
            REGION_LEN,
            None,
        ))?;
        config.add_capability(&vendor_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            REGION_LEN,
            Some(NOTIFY_OFF_MULTIPLIER),
        ))?;
        config.add_capability(&vendor_cap(
            VIRTIO_PCI_CAP_ISR_CFG,
            ISR_OFFSET,
            REGION_LEN,
            None,
        ))?;
        config.add_capability(&vendor_cap(
            VIRTIO_PCI_CAP_DEVICE_CFG,
            DEVICE_CFG_OFFSET,
            REGION_LEN,
            None,
        ))?;
        // PCI_CFG window: bar, offset, length and data are the driver's to write.
        let pci_cfg = vendor_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, Some(0));
        let mut pci_cfg_mask = vec![0u8; pci_cfg.len()];
        pci_cfg_mask[4] = 0xff;
        pci_cfg_mask[8..20].fill(0xff);
        let pci_cfg_cap = config.add_capability_with_mask(&pci_cfg, &pci_cfg_mask)?;
        let (cap, mask) = msix.capability(
            0,
            u32::try_from(MSIX_TABLE_OFFSET).expect("fits"),
            u32::try_from(MSIX_PBA_OFFSET).expect("fits"),
        );
        let msix_cap = config.add_capability_with_mask(&cap, &mask)?;

        let evt = || EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd);
        let kicks = (0..num_queues).map(|_| evt()).collect::<Result<_, _>>()?;
        let mut vectors = Vec::with_capacity(usize::from(num_vectors));
        for vector in 0..usize::from(num_vectors) {
            let gsi = router
                .allocate_msi()
                .map_err(|source| TransportError::Gsi { vector, source })?;
            vectors.push(Vector {
                call: evt()?,
                gsi,
                registered: false,
            });
        }
        let max = backend.max_queue_size();
        Ok(Self {
            label: info.label.clone(),
            config,
            offered: features & TRANSPORT_FEATURE_MASK,
            backend,
            vm,
            router,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            msix_config: NO_VECTOR,
            device_status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: vec![QueueRegs::new(max); num_queues],
            isr: 0,
            backend_started: false,
            kicks,
            notify_bar: None,
            msix,
            vectors,
            unrouted_call: evt()?,
            msix_cap,
            pci_cfg_cap,
        })
    }

    /// Registers each queue's notify address as an ioeventfd, at the BAR0 address the PCI root
    /// assigned. Call once after `add_device`; BAR moves re-register by themselves.
    pub fn register_notifiers(&mut self) -> Result<(), TransportError> {
        let bar = self.config.bar_addr(0);
        self.register_ioevents(bar)
    }

    fn register_ioevents(&mut self, bar: u64) -> Result<(), TransportError> {
        self.unregister_ioevents();
        for (queue, kick) in self.kicks.iter().enumerate() {
            if self.backend.serves_queue(queue) {
                continue;
            }
            let addr = notify_address(bar, queue);
            if let Err(source) = self.vm.register_ioevent(kick, addr) {
                for (q, k) in self.kicks.iter().enumerate().take(queue) {
                    if !self.backend.serves_queue(q) {
                        let _ = self.vm.unregister_ioevent(k, notify_address(bar, q));
                    }
                }
                return Err(TransportError::Ioevent {
                    queue,
                    addr,
                    source,
                });
            }
        }
        self.notify_bar = Some(bar);
        Ok(())
    }

    fn unregister_ioevents(&mut self) {
        let Some(bar) = self.notify_bar.take() else {
            return;
        };
        for (queue, kick) in self.kicks.iter().enumerate() {
            if self.backend.serves_queue(queue) {
                continue;
            }
            let addr = notify_address(bar, queue);
            if let Err(e) = self.vm.unregister_ioevent(kick, addr) {
                tracing::warn!(device = %self.label, queue, addr, "cannot unregister a notify ioeventfd: {e}");
            }
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutable (e.g. to reconnect it).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The device config changed under the driver (e.g. a reconnected backend reports another
    /// capacity): bump `config_generation` and raise the config interrupt.
    pub fn notify_config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.isr |= ISR_CONFIG;
        if let Some(v) = self.vectors.get(usize::from(self.msix_config))
            && let Err(e) = v.call.write(1)
        {
            tracing::warn!(device = %self.label, "cannot signal the config interrupt: {e}");
        }
    }

    fn needs_reset(&mut self, why: &dyn std::fmt::Display) {
        tracing::error!(device = %self.label, "{why}; the device needs a reset");
        self.device_status |= status::DEVICE_NEEDS_RESET;
        self.notify_config_changed();
    }

    // ---- common configuration -------------------------------------------------------------

    fn selected_queue(&self) -> Option<usize> {
        let q = usize::from(self.queue_select);
        (q < self.queues.len()).then_some(q)
    }

    fn common_image(&self) -> [u8; common::LEN] {
        let mut img = [0u8; common::LEN];
        let window = |v: u64, sel: u32| match sel {
            0 => low32(v),
            1 => high32(v),
            _ => 0,
        };
        put(
            &mut img,
            common::DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(
            &mut img,
            common::DEVICE_FEATURE,
            &window(self.offered, self.device_feature_select).to_le_bytes(),
        );
        put(
            &mut img,
            common::DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        put(
            &mut img,
            common::DRIVER_FEATURE,
            &window(self.driver_features, self.driver_feature_select).to_le_bytes(),
        );
        put(
            &mut img,
            common::MSIX_CONFIG,
            &self.msix_config.to_le_bytes(),
        );
        let nq = u16::try_from(self.queues.len()).expect("at most 255 queues");
        put(&mut img, common::NUM_QUEUES, &nq.to_le_bytes());
        img[common::DEVICE_STATUS] = self.device_status;
        img[common::CONFIG_GENERATION] = self.config_generation;
        put(
            &mut img,
            common::QUEUE_SELECT,
            &self.queue_select.to_le_bytes(),
        );
        if let Some(q) = self.selected_queue() {
            let r = &self.queues[q];
            put(&mut img, common::QUEUE_SIZE, &r.size.to_le_bytes());
            put(&mut img, common::QUEUE_MSIX_VECTOR, &r.vector.to_le_bytes());
            put(
                &mut img,
                common::QUEUE_ENABLE,
                &u16::from(r.enabled).to_le_bytes(),
            );
            put(
                &mut img,
                common::QUEUE_NOTIFY_OFF,
                &self.queue_select.to_le_bytes(),
            );
            put(&mut img, common::QUEUE_DESC, &r.desc.to_le_bytes());
            put(&mut img, common::QUEUE_DRIVER, &r.avail.to_le_bytes());
            put(&mut img, common::QUEUE_DEVICE, &r.used.to_le_bytes());
        }
        img
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let img = self.common_image();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| img.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Writes apply field by field: the written bytes are laid over the current register
    /// image, then every field they touch takes its new value (any access width works).
    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= common::LEN {
            return;
        }
        let end = (start + data.len()).min(common::LEN);
        let mut img = self.common_image();
        img[start..end].copy_from_slice(&data[..end - start]);
        // Read-only fields (device_feature, num_queues, config_generation, queue_notify_off)
        // are not listed: writes to them are dropped.
        const FIELDS: [(usize, usize); 12] = [
            (common::DEVICE_FEATURE_SELECT, 4),
            (common::DRIVER_FEATURE_SELECT, 4),
            (common::DRIVER_FEATURE, 4),
            (common::MSIX_CONFIG, 2),
            (common::DEVICE_STATUS, 1),
            (common::QUEUE_SELECT, 2),
            (common::QUEUE_SIZE, 2),
            (common::QUEUE_MSIX_VECTOR, 2),
            (common::QUEUE_ENABLE, 2),
            (common::QUEUE_DESC, 8),
            (common::QUEUE_DRIVER, 8),
            (common::QUEUE_DEVICE, 8),
        ];
        for &(field, len) in &FIELDS {
            if !PciConfiguration::overlaps(start, end - start, field..field + len) {
                continue;
            }
            self.write_common_field(field, &img);
        }
    }

    fn write_common_field(&mut self, field: usize, img: &[u8]) {
        let features_locked = self.device_status & status::FEATURES_OK != 0;
        match field {
            common::DEVICE_FEATURE_SELECT => {
                self.device_feature_select = get_u32(img, field);
            }
            common::DRIVER_FEATURE_SELECT => {
                self.driver_feature_select = get_u32(img, field);
            }
            common::DRIVER_FEATURE => {
                if features_locked {
                    tracing::debug!(device = %self.label, "driver_feature written after FEATURES_OK; ignored");
                    return;
                }
                let v = u64::from(get_u32(img, field));
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            common::MSIX_CONFIG => {
                self.msix_config = self.valid_vector(get_u16(img, field));
            }
            common::DEVICE_STATUS => self.write_status(img[field]),
            common::QUEUE_SELECT => self.queue_select = get_u16(img, field),
            _ => self.write_queue_field(field, img),
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.vectors.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_queue_field(&mut self, field: usize, img: &[u8]) {
        let Some(q) = self.selected_queue() else {
            return;
        };
        if self.device_status & status::DRIVER_OK != 0 {
            tracing::debug!(device = %self.label, queue = q, field, "queue register written after DRIVER_OK; ignored");
            return;
        }
        let vector = self.valid_vector(get_u16(img, common::QUEUE_MSIX_VECTOR));
        let r = &mut self.queues[q];
        match field {
            common::QUEUE_SIZE => {
                let size = get_u16(img, field);
                if size != 0 && size <= r.max && size.is_power_of_two() {
                    r.size = size;
                } else {
                    tracing::debug!(device = %self.label, queue = q, size, max = r.max, "invalid queue size ignored");
                }
            }
            common::QUEUE_MSIX_VECTOR => r.vector = vector,
            // Only 1 means something (0 would be a queue reset, not offered).
            common::QUEUE_ENABLE if get_u16(img, field) == 1 => r.enabled = true,
            common::QUEUE_DESC => r.desc = get_u64(img, field),
            common::QUEUE_DRIVER => r.avail = get_u64(img, field),
            common::QUEUE_DEVICE => r.used = get_u64(img, field),
            _ => {}
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        let mut new = value | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.offered;
            if unknown != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                tracing::warn!(device = %self.label,
                    features = format_args!("{:#x}", self.driver_features),
                    unknown = format_args!("{unknown:#x}"),
                    "driver features refused (unknown bits or no VERSION_1)");
                new &= !status::FEATURES_OK;
            }
        }
        self.device_status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if new & status::FEATURES_OK == 0 {
                self.needs_reset(&"DRIVER_OK without FEATURES_OK");
            } else if new & status::FAILED == 0 {
                self.activate();
            }
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        for (i, r) in self.queues.iter().enumerate().filter(|(_, r)| r.enabled) {
            let call = match self.vectors.get(usize::from(r.vector)) {
                Some(v) => &v.call,
                None => &self.unrouted_call,
            };
            queues.push(ActiveQueue {
                config: QueueConfig {
                    index: u16::try_from(i).expect("at most 255 queues"),
                    size: r.size,
                    desc: r.desc,
                    avail: r.avail,
                    used: r.used,
                },
                kick: &self.kicks[i],
                call,
            });
        }
        self.backend_started = true;
        let result = self.backend.activate(self.driver_features, &queues);
        drop(queues);
        match result {
            Ok(()) => tracing::info!(device = %self.label,
                features = format_args!("{:#x}", self.driver_features),
                queues = self.queues.iter().filter(|r| r.enabled).count(),
                "device activated"),
            Err(e) => self.needs_reset(&format_args!(
                "cannot start the device: {}",
                crate::error_chain(&e)
            )),
        }
    }

    /// Device reset (status 0): stop the backend, return every register to its reset value.
    fn reset(&mut self) {
        if self.backend_started {
            if let Err(e) = self.backend.reset() {
                tracing::warn!(device = %self.label, "stopping the device on reset failed: {}", crate::error_chain(&e));
            }
            self.backend_started = false;
        }
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.msix_config = NO_VECTOR;
        self.device_status = 0;
        self.queue_select = 0;
        for r in &mut self.queues {
            *r = QueueRegs::new(r.max);
        }
        self.isr = 0;
        tracing::debug!(device = %self.label, "device reset");
    }

    // ---- MSI-X -------------------------------------------------------------------------------

    /// Makes vector `v`'s irqfd and route match its table entry and masks.
    fn sync_vector(&mut self, v: usize) {
        let Some(vector) = self.vectors.get_mut(v) else {
            return;
        };
        if self.msix.is_active(v) {
            let msg = self.msix.entry(v).expect("vector exists").message();
            if let Err(e) = self.router.set_msi_route(vector.gsi, msg) {
                tracing::warn!(device = %self.label, vector = v, gsi = vector.gsi, "cannot route MSI-X vector: {e}");
            }
            if !vector.registered {
                match self.vm.register_irqfd(&vector.call, vector.gsi) {
                    Ok(()) => vector.registered = true,
                    Err(e) => {
                        tracing::warn!(device = %self.label, vector = v, gsi = vector.gsi, "cannot register the irqfd of MSI-X vector: {e}");
                    }
                }
            }
        } else if vector.registered {
            match self.vm.unregister_irqfd(&vector.call, vector.gsi) {
                Ok(()) => vector.registered = false,
                Err(e) => {
                    tracing::warn!(device = %self.label, vector = v, gsi = vector.gsi, "cannot unregister the irqfd of MSI-X vector: {e}");
                }
            }
        }
    }

    fn sync_all_vectors(&mut self) {
        for v in 0..self.vectors.len() {
            self.sync_vector(v);
        }
    }

    fn msix_control(&self) -> u16 {
        let mut b = [0u8; 2];
        self.config.read_bytes(self.msix_cap + 2, &mut b);
        u16::from_le_bytes(b)
    }

    // ---- PCI_CFG access window ---------------------------------------------------------------

    /// The window's (bar, offset, length) if it addresses BAR0 with a valid access.
    fn pci_cfg_target(&self) -> Option<(u64, usize)> {
        let c = self.pci_cfg_cap;
        let mut b = [0u8; 12];
        self.config.read_bytes(c + 4, &mut b);
        let bar = b[0];
        let offset = u64::from(u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")));
        let length = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let ok = bar == 0
            && matches!(length, 1 | 2 | 4)
            && offset % u64::from(length) == 0
            && offset + u64::from(length) <= BAR0_SIZE;
        ok.then(|| (offset, usize::try_from(length).expect("1, 2 or 4")))
    }

    fn pci_cfg_read(&mut self) {
        let mut data = [0u8; 4];
        if let Some((offset, len)) = self.pci_cfg_target() {
            self.read_bar(0, offset, &mut data[..len]);
        }
        let at = self.pci_cfg_cap + 16;
        self.config.write_bytes(at, &data);
    }

    fn pci_cfg_write(&mut self) {
        let Some((offset, len)) = self.pci_cfg_target() else {
            return;
        };
        let mut data = [0u8; 4];
        self.config.read_bytes(self.pci_cfg_cap + 16, &mut data);
        self.write_bar(0, offset, &data[..len]);
    }
}

impl<B: VirtioBackend> PciDevice for VirtioPciDevice<B> {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        if reg_idx * 4 == self.pci_cfg_cap + 16 {
            self.pci_cfg_read();
        }
        self.config.read_reg(reg_idx)
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg_idx, offset, data);
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        let start = reg_idx * 4 + offset;
        let control = self.msix_cap + 2..self.msix_cap + 4;
        if PciConfiguration::overlaps(start, data.len(), control) {
            let control = self.msix_control();
            if self.msix.set_control(control) {
                tracing::debug!(device = %self.label, enabled = self.msix.enabled(),
                    function_masked = self.msix.function_masked(), "MSI-X control");
                self.sync_all_vectors();
            }
        }
        let window = self.pci_cfg_cap + 16..self.pci_cfg_cap + 20;
        if PciConfiguration::overlaps(start, data.len(), window) {
            self.pci_cfg_write();
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let region = offset / REGION_LEN * REGION_LEN;
        let within = offset - region;
        match region {
            COMMON_CFG_OFFSET => self.read_common(within, data),
            ISR_OFFSET if within == 0 => {
                data[0] = self.isr;
                self.isr = 0;
            }
            DEVICE_CFG_OFFSET => {
                let cfg = self.backend.config();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = usize::try_from(within)
                        .ok()
                        .and_then(|w| cfg.get(w + i))
                        .copied()
                        .unwrap_or(0);
                }
            }
            MSIX_TABLE_OFFSET => self.msix.read_table(within, data),
            MSIX_PBA_OFFSET => {
                let (msix, vectors) = (&self.msix, &self.vectors);
                msix.read_pba(within, data, |v| {
                    !msix.is_active(v) && eventfd_pending(&vectors[v].call)
                });
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let region = offset / REGION_LEN * REGION_LEN;
        let within = offset - region;
        match region {
            COMMON_CFG_OFFSET => self.write_common(within, data),
            DEVICE_CFG_OFFSET => {
                let Ok(within) = u32::try_from(within) else {
                    return;
                };
                match self.backend.write_config(within, data) {
                    Ok(true) => self.config_generation = self.config_generation.wrapping_add(1),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(device = %self.label, offset = within,
                        "config write failed: {}", crate::error_chain(&e)),
                }
            }
            NOTIFY_OFFSET => {
                // Notifies normally end in the ioeventfd; this is the path when they arrive
                // through the PCI_CFG window or before the ioeventfds exist.
                // The core's own queues (virtio-net's control queue) always come this way.
                let q = within / u64::from(NOTIFY_OFF_MULTIPLIER);
                let Some(q) = usize::try_from(q).ok().filter(|&q| q < self.kicks.len()) else {
                    return;
                };
                if self.backend.serves_queue(q) {
                    if self.backend_started
                        && self.device_status & status::DEVICE_NEEDS_RESET == 0
                        && self.backend.queue_notify(q)
                    {
                        // The driver's own command changed it: no config interrupt.
                        self.config_generation = self.config_generation.wrapping_add(1);
                    }
                } else if let Err(e) = self.kicks[q].write(1) {
                    tracing::warn!(device = %self.label, queue = q, "cannot signal a kick: {e}");
                }
            }
            MSIX_TABLE_OFFSET => {
                for v in self.msix.write_table(within, data) {
                    self.sync_vector(v);
                }
            }
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, old: u64, new: u64) {
        if bar != 0 {
            return;
        }
        tracing::debug!(device = %self.label, old, new, "BAR0 moved; re-registering notifiers");
        self.unregister_ioevents();
        if let Err(e) = self.register_ioevents(new) {
            tracing::warn!(device = %self.label, "notifies will exit to the core: {}", crate::error_chain(&e));
        }
    }
}

/// Accessors for tests.
#[cfg(test)]
impl<B: VirtioBackend> VirtioPciDevice<B> {
    /// Feature bits offered to the driver.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Queue `q`'s kick eventfd (the notify ioeventfd).
    pub fn kick_eventfd(&self, queue: usize) -> Option<&EventFd> {
        self.kicks.get(queue)
    }

    /// MSI-X vector `v`'s eventfd and GSI.
    pub fn vector(&self, vector: usize) -> Option<(&EventFd, u32)> {
        self.vectors.get(vector).map(|v| (&v.call, v.gsi))
    }

    /// Whether the DRIVER_OK activation handed the queues to the backend.
    pub fn is_active(&self) -> bool {
        self.backend_started && self.device_status & status::DEVICE_NEEDS_RESET == 0
    }
}
