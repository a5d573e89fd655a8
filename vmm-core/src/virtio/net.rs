//! virtio-net: one virtio-pci device per NIC. Its receive and transmit queues run in a
//! vhost-user backend (dev-net, or any other vhost-user-net backend); the core builds the config
//! space itself and runs the control queue, as QEMU and Cloud Hypervisor do
//! (`reference/protocols-crates.md` §1.3 "net specifics").
//!
//! Queues: rx0, tx0, rx1, tx1, ..., then the control queue. Only the first pair is enabled at
//! DRIVER_OK; `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` enables and disables the others with
//! SET_VRING_ENABLE (dev-net then attaches or detaches the matching tap queue, so the host
//! never steers packets to a queue the guest does not serve).
//!
//! The control queue is served on the vCPU thread that notified it: its notify address has no
//! ioeventfd, and Linux waits for each command's answer by polling the used ring, so the
//! answer is there when the vCPU resumes. Receive-mode and MAC-filter commands are validated
//! and recorded; the tap hands the backend every frame addressed to the tap, and the guest's
//! stack drops what its filter does not want (what QEMU does with a vhost backend too).

#![forbid(unsafe_code)]

use super::pci::{DeviceInfo, TransportError, VirtioPciDevice};
use super::vhost_user::{ConfigPolicy, VhostUserDevice, VhostUserError, VhostUserParams};
use super::{ActiveQueue, VIRTIO_F_VERSION_1, VirtioBackend, VmEventFds};
use crate::devices::PciRoot;
use crate::devices::pci::PciError;
use crate::irq_routing::GsiRouter;
use crate::memory::GuestMemoryMmap;
use ipc::control::NetConfig;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_net as vn;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// virtio device type of a network card.
pub const VIRTIO_ID_NET: u16 = 1;
/// Queue size limit offered to the driver.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// PCI class: network controller, Ethernet, as QEMU's virtio-net-pci.
const CLASS_NETWORK: u8 = 0x02;
const SUBCLASS_ETHERNET: u8 = 0x00;
/// Largest control command the core reads (a MAC table of about 10 000 addresses).
const MAX_CTRL_COMMAND: usize = 64 * 1024;

/// The most queue pairs a NIC may have (the transport's 255 queues, minus the control queue).
pub const MAX_QUEUE_PAIRS: u16 = 127;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Features whose work happens in the backend: offered when the backend offers them.
const BACKEND_FEATURES: u64 = bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_ECN)
    | bit(vn::VIRTIO_NET_F_GUEST_UFO)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_HOST_ECN)
    | bit(vn::VIRTIO_NET_F_HOST_UFO)
    | bit(vn::VIRTIO_NET_F_GUEST_USO4)
    | bit(vn::VIRTIO_NET_F_GUEST_USO6)
    | bit(vn::VIRTIO_NET_F_HOST_USO)
    | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_F_VERSION_1);

/// Features the core implements itself (config space and control queue).
const CORE_FEATURES: u64 = bit(vn::VIRTIO_NET_F_MAC)
    | bit(vn::VIRTIO_NET_F_STATUS)
    | bit(vn::VIRTIO_NET_F_CTRL_VQ)
    | bit(vn::VIRTIO_NET_F_CTRL_RX)
    | bit(vn::VIRTIO_NET_F_CTRL_MAC_ADDR);

/// `struct virtio_net_config` up to `mtu`, plus `speed` and `duplex` (unknown).
const CONFIG_LEN: usize = 17;
const CONFIG_MAC: usize = 0;
const CONFIG_STATUS: usize = 6;
const CONFIG_MAX_PAIRS: usize = 8;
const CONFIG_MTU: usize = 10;
const CONFIG_SPEED: usize = 12;
const CONFIG_DUPLEX: usize = 16;

/// Errors of creating the NICs.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{nics} NIC configurations but {sockets} backend sockets")]
    Count { nics: usize, sockets: usize },
    #[error("NIC {id}: {pairs} queue pairs asked; 1 to {MAX_QUEUE_PAIRS} are possible")]
    Pairs { id: String, pairs: u16 },
    #[error("NIC {id}: cannot negotiate with its vhost-user backend")]
    Negotiate {
        id: String,
        #[source]
        source: VhostUserError,
    },
    #[error("NIC {id}: the backend has {queues} queues; a NIC needs an even number (rx/tx pairs)")]
    OddQueues { id: String, queues: usize },
    #[error("NIC {id}: cannot build its virtio-pci transport")]
    Transport {
        id: String,
        #[source]
        source: TransportError,
    },
    #[error("NIC {id}: cannot plug it into PCI bus 0")]
    Pci {
        id: String,
        #[source]
        source: PciError,
    },
}

/// The backend's config space is not used: the core builds its own.
pub(crate) struct NoBackendConfig;

impl ConfigPolicy for NoBackendConfig {
    fn fixup(&self, _config: &mut [u8], _num_queues: usize) {}
    fn writable(&self, _offset: u32, _len: usize, _features: u64) -> bool {
        false
    }
}

/// The receive filter the driver asked for through the control queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFilter {
    pub promisc: bool,
    pub allmulti: bool,
    pub unicast: Vec<[u8; 6]>,
    pub multicast: Vec<[u8; 6]>,
}

impl Default for RxFilter {
    /// After reset a virtio-net device receives everything (virtio 1.2 §5.1.6.5.1).
    fn default() -> Self {
        Self {
            promisc: true,
            allmulti: true,
            unicast: Vec::new(),
            multicast: Vec::new(),
        }
    }
}

/// A decoded control command (virtio 1.2 §5.1.6.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CtrlCommand {
    Promisc(bool),
    AllMulti(bool),
    MacTable {
        unicast: Vec<[u8; 6]>,
        multicast: Vec<[u8; 6]>,
    },
    MacAddr([u8; 6]),
    QueuePairs(u16),
}

/// Why a control command is answered with `VIRTIO_NET_ERR`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CtrlError {
    #[error("command shorter than its 2-byte header")]
    NoHeader,
    #[error("class {class} command {command} is not supported or not negotiated")]
    Unsupported { class: u8, command: u8 },
    #[error("class {class} command {command}: {len} bytes of data, expected {expected}")]
    Length {
        class: u8,
        command: u8,
        len: usize,
        expected: String,
    },
    #[error("MAC table of {entries} entries does not fit the {len} bytes sent")]
    MacTable { entries: u32, len: usize },
    #[error("{pairs} queue pairs asked; 1 to {max} are possible")]
    Pairs { pairs: u16, max: u16 },
}

/// Decodes a control command: `data` is every device-readable byte of the chain (class,
/// command, then the command's data); `features` are the negotiated ones.
pub fn parse_ctrl(data: &[u8], features: u64, max_pairs: u16) -> Result<CtrlCommand, CtrlError> {
    let [class, command, body @ ..] = data else {
        return Err(CtrlError::NoHeader);
    };
    let (class, command) = (*class, *command);
    let has = |f: u32| features & bit(f) != 0;
    let len_err = |expected: &str| CtrlError::Length {
        class,
        command,
        len: body.len(),
        expected: expected.to_owned(),
    };
    let unsupported = CtrlError::Unsupported { class, command };
    let class32 = u32::from(class);
    let command32 = u32::from(command);
    if class32 == vn::VIRTIO_NET_CTRL_RX && has(vn::VIRTIO_NET_F_CTRL_RX) {
        let [on] = body else {
            return Err(len_err("1"));
        };
        return match command32 {
            vn::VIRTIO_NET_CTRL_RX_PROMISC => Ok(CtrlCommand::Promisc(*on != 0)),
            vn::VIRTIO_NET_CTRL_RX_ALLMULTI => Ok(CtrlCommand::AllMulti(*on != 0)),
            _ => Err(unsupported),
        };
    }
    if class32 == vn::VIRTIO_NET_CTRL_MAC {
        if command32 == vn::VIRTIO_NET_CTRL_MAC_TABLE_SET && has(vn::VIRTIO_NET_F_CTRL_RX) {
            let (unicast, rest) = mac_table(body)?;
            let (multicast, rest) = mac_table(rest)?;
            if !rest.is_empty() {
                return Err(len_err("two MAC tables and nothing more"));
            }
            return Ok(CtrlCommand::MacTable { unicast, multicast });
        }
        if command32 == vn::VIRTIO_NET_CTRL_MAC_ADDR_SET && has(vn::VIRTIO_NET_F_CTRL_MAC_ADDR) {
            let mac: [u8; 6] = body.try_into().map_err(|_| len_err("6"))?;
            return Ok(CtrlCommand::MacAddr(mac));
        }
        return Err(unsupported);
    }
    if class32 == vn::VIRTIO_NET_CTRL_MQ
        && command32 == vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
        && has(vn::VIRTIO_NET_F_MQ)
    {
        let pairs: [u8; 2] = body.try_into().map_err(|_| len_err("2"))?;
        let pairs = u16::from_le_bytes(pairs);
        if pairs == 0 || pairs > max_pairs {
            return Err(CtrlError::Pairs {
                pairs,
                max: max_pairs,
            });
        }
        return Ok(CtrlCommand::QueuePairs(pairs));
    }
    Err(unsupported)
}

/// One `struct virtio_net_ctrl_mac` (le32 entries, then 6 bytes per entry) and what follows.
fn mac_table(data: &[u8]) -> Result<(Vec<[u8; 6]>, &[u8]), CtrlError> {
    let Some((count, rest)) = data.split_first_chunk::<4>() else {
        return Err(CtrlError::MacTable {
            entries: 0,
            len: data.len(),
        });
    };
    let entries = u32::from_le_bytes(*count);
    let bytes = usize::try_from(entries)
        .ok()
        .and_then(|n| n.checked_mul(6))
        .filter(|&n| n <= rest.len())
        .ok_or(CtrlError::MacTable {
            entries,
            len: data.len(),
        })?;
    let (macs, rest) = rest.split_at(bytes);
    let macs = macs
        .chunks_exact(6)
        .map(|m| m.try_into().expect("chunks of 6"))
        .collect();
    Ok((macs, rest))
}

/// The control queue while the device runs.
struct CtrlQueue {
    queue: Queue,
    call: EventFd,
}

/// A NIC: the vhost-user backend for its data queues, its config space and control queue.
pub struct NetDevice {
    label: String,
    backend: VhostUserDevice,
    mem: GuestMemoryMmap,
    pairs: u16,
    features: u64,
    config: [u8; CONFIG_LEN],
    /// Negotiated features while running.
    driver_features: u64,
    ctrl: Option<CtrlQueue>,
    active_pairs: u16,
    filter: RxFilter,
}

impl NetDevice {
    /// A NIC over `backend`, which must run `2 * pairs` queues.
    pub(crate) fn new(
        label: String,
        backend: VhostUserDevice,
        mem: GuestMemoryMmap,
        nic: &NetConfig,
    ) -> Self {
        let pairs = u16::try_from(backend.num_queues() / 2).unwrap_or(MAX_QUEUE_PAIRS);
        let mut features = backend.device_features() & BACKEND_FEATURES | CORE_FEATURES;
        if pairs > 1 {
            features |= bit(vn::VIRTIO_NET_F_MQ);
        }
        let mut config = [0u8; CONFIG_LEN];
        config[CONFIG_MAC..CONFIG_MAC + 6].copy_from_slice(&nic.mac);
        let link_up = u16::try_from(vn::VIRTIO_NET_S_LINK_UP).expect("bit 0");
        config[CONFIG_STATUS..CONFIG_STATUS + 2].copy_from_slice(&link_up.to_le_bytes());
        config[CONFIG_MAX_PAIRS..CONFIG_MAX_PAIRS + 2].copy_from_slice(&pairs.to_le_bytes());
        if let Some(mtu) = nic.mtu {
            features |= bit(vn::VIRTIO_NET_F_MTU);
            config[CONFIG_MTU..CONFIG_MTU + 2].copy_from_slice(&mtu.to_le_bytes());
        }
        config[CONFIG_SPEED..CONFIG_SPEED + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        config[CONFIG_DUPLEX] = 0xff;
        Self {
            label,
            backend,
            mem,
            pairs,
            features,
            config,
            driver_features: 0,
            ctrl: None,
            active_pairs: 1,
            filter: RxFilter::default(),
        }
    }

    fn ctrl_index(&self) -> usize {
        usize::from(self.pairs) * 2
    }

    /// The receive filter the driver set.
    #[cfg(test)]
    pub fn rx_filter(&self) -> &RxFilter {
        &self.filter
    }

    /// Queue pairs in use.
    #[cfg(test)]
    pub fn active_pairs(&self) -> u16 {
        self.active_pairs
    }

    /// Carries out a decoded command; `Ok(true)` if the config space changed.
    fn execute(&mut self, cmd: CtrlCommand) -> Result<bool, VhostUserError> {
        match cmd {
            CtrlCommand::Promisc(on) => self.filter.promisc = on,
            CtrlCommand::AllMulti(on) => self.filter.allmulti = on,
            CtrlCommand::MacTable { unicast, multicast } => {
                self.filter.unicast = unicast;
                self.filter.multicast = multicast;
            }
            CtrlCommand::MacAddr(mac) => {
                let changed = self.config[CONFIG_MAC..CONFIG_MAC + 6] != mac;
                self.config[CONFIG_MAC..CONFIG_MAC + 6].copy_from_slice(&mac);
                return Ok(changed);
            }
            CtrlCommand::QueuePairs(n) => {
                for pair in 0..self.pairs {
                    let on = pair < n;
                    // Disabled before the answer is posted: the spec forbids using the
                    // dropped queues once the command completes.
                    self.backend.set_queue_enabled(2 * pair, on)?;
                    self.backend.set_queue_enabled(2 * pair + 1, on)?;
                }
                self.active_pairs = n;
            }
        }
        Ok(false)
    }

    /// Serves every available control command. Returns whether the config space changed.
    fn serve_ctrl(&mut self) -> bool {
        let Some(mut ctrl) = self.ctrl.take() else {
            return false;
        };
        let mut changed = false;
        let mut completed = false;
        // With EVENT_IDX the driver notifies only past `avail_event`, which
        // `enable_notification` moves to where the core stopped: without that, every command
        // after the first would wait forever for a notify the driver never sends.
        loop {
            while let Some(chain) = ctrl.queue.pop_descriptor_chain(&self.mem) {
                let head = chain.head_index();
                let mut data = Vec::new();
                let mut status_at = None;
                let mut malformed = false;
                for desc in chain {
                    if desc.is_write_only() {
                        if desc.len() >= 1 {
                            status_at.get_or_insert(desc.addr());
                        }
                        continue;
                    }
                    let len = usize::try_from(desc.len()).unwrap_or(usize::MAX);
                    if status_at.is_some() || data.len() + len > MAX_CTRL_COMMAND {
                        malformed = true;
                        break;
                    }
                    let start = data.len();
                    data.resize(start + len, 0);
                    if self
                        .mem
                        .read_slice(&mut data[start..], desc.addr())
                        .is_err()
                    {
                        malformed = true;
                        break;
                    }
                }
                let written = match status_at {
                    Some(at) if !malformed => {
                        let ack = match parse_ctrl(&data, self.driver_features, self.pairs) {
                            Ok(cmd) => {
                                tracing::debug!(device = %self.label, ?cmd, "control command");
                                match self.execute(cmd) {
                                    Ok(c) => {
                                        changed |= c;
                                        vn::VIRTIO_NET_OK
                                    }
                                    Err(e) => {
                                        // The state is kept and replayed on reconnect.
                                        tracing::warn!(device = %self.label,
                                            "control command applied while the backend is unreachable: {}",
                                            crate::error_chain(&e));
                                        vn::VIRTIO_NET_OK
                                    }
                                }
                            }
                            Err(e) => {
                                tracing::debug!(device = %self.label, "control command refused: {e}");
                                vn::VIRTIO_NET_ERR
                            }
                        };
                        let ack = u8::try_from(ack).expect("0 or 1");
                        u32::from(self.mem.write_obj(ack, at).is_ok())
                    }
                    _ => {
                        tracing::warn!(device = %self.label, head,
                            "malformed control chain (no status byte, data after it, unreadable or over {MAX_CTRL_COMMAND} bytes) dropped");
                        0
                    }
                };
                if let Err(e) = ctrl.queue.add_used(&self.mem, head, written) {
                    tracing::warn!(device = %self.label, "cannot complete a control command: {e}");
                    break;
                }
                completed = true;
            }
            match ctrl.queue.enable_notification(&self.mem) {
                Ok(true) => {}
                Ok(false) | Err(_) => break,
            }
        }
        if completed {
            match ctrl.queue.needs_notification(&self.mem) {
                Ok(false) => {}
                Ok(true) | Err(_) => {
                    let _ = ctrl.call.write(1);
                }
            }
        }
        self.ctrl = Some(ctrl);
        changed
    }

    fn build_ctrl(&self, q: &ActiveQueue<'_>, features: u64) -> Option<CtrlQueue> {
        let c = &q.config;
        // The driver may size the control queue up to the transport's limit.
        let mut queue = Queue::new(MAX_QUEUE_SIZE).ok()?;
        queue.set_size(c.size);
        queue
            .try_set_desc_table_address(GuestAddress(c.desc))
            .ok()?;
        queue
            .try_set_avail_ring_address(GuestAddress(c.avail))
            .ok()?;
        queue.try_set_used_ring_address(GuestAddress(c.used)).ok()?;
        queue.set_event_idx(features & bit(VIRTIO_RING_F_EVENT_IDX) != 0);
        queue.set_ready(true);
        if !queue.is_valid(&self.mem) {
            return None;
        }
        Some(CtrlQueue {
            queue,
            call: q.call.try_clone().ok()?,
        })
    }
}

impl VirtioBackend for NetDevice {
    type Error = VhostUserError;

    fn device_features(&self) -> u64 {
        self.features
    }

    fn num_queues(&self) -> usize {
        self.ctrl_index() + 1
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<bool, VhostUserError> {
        // Modern virtio-net's config space is read-only; the MAC changes through the control
        // queue.
        tracing::debug!(device = %self.label, offset, len = data.len(), "read-only config write dropped");
        Ok(false)
    }

    fn activate(
        &mut self,
        features: u64,
        queues: &[ActiveQueue<'_>],
    ) -> Result<(), VhostUserError> {
        let ctrl_index = u16::try_from(self.ctrl_index()).expect("at most 255 queues");
        self.driver_features = features;
        self.active_pairs = 1;
        self.filter = RxFilter::default();
        self.ctrl = queues
            .iter()
            .find(|q| q.config.index == ctrl_index)
            .and_then(|q| {
                let ctrl = self.build_ctrl(q, features);
                if ctrl.is_none() {
                    tracing::warn!(device = %self.label, "the control queue's rings are not in guest RAM; commands are ignored");
                }
                ctrl
            });
        let data: Vec<ActiveQueue<'_>> = queues
            .iter()
            .filter(|q| q.config.index < ctrl_index)
            .map(|q| ActiveQueue {
                config: q.config,
                kick: q.kick,
                call: q.call,
            })
            .collect();
        let backend_features =
            features & (self.backend.device_features() | bit(VIRTIO_F_VERSION_1));
        // Multiqueue starts disabled: only rx0/tx0 run until VQ_PAIRS_SET.
        self.backend
            .activate_with(backend_features, &data, |index| index < 2)
    }

    fn reset(&mut self) -> Result<(), VhostUserError> {
        self.ctrl = None;
        self.active_pairs = 1;
        self.filter = RxFilter::default();
        self.driver_features = 0;
        self.backend.reset()
    }

    fn serves_queue(&self, queue: usize) -> bool {
        queue == self.ctrl_index()
    }

    fn queue_notify(&mut self, queue: usize) -> bool {
        queue == self.ctrl_index() && self.serve_ctrl()
    }
}

/// A NIC on the PCI bus.
pub type NetPciDevice = Arc<Mutex<VirtioPciDevice<NetDevice>>>;

impl NetDevice {
    /// Sets the link status bit; returns whether it changed.
    fn set_link(&mut self, up: bool) -> bool {
        let bit = u16::try_from(vn::VIRTIO_NET_S_LINK_UP).expect("bit 0");
        let old = u16::from_le_bytes([self.config[CONFIG_STATUS], self.config[CONFIG_STATUS + 1]]);
        let new = if up { old | bit } else { old & !bit };
        self.config[CONFIG_STATUS..CONFIG_STATUS + 2].copy_from_slice(&new.to_le_bytes());
        old != new
    }
}

impl super::Restartable for VirtioPciDevice<NetDevice> {
    /// The backend process died: drop its connection and show the link down.
    fn backend_down(&mut self) {
        self.backend_mut().backend.disconnect_quietly();
        if self.backend_mut().set_link(false) {
            self.notify_config_changed();
        }
    }

    /// A new backend incarnation: replay the setup on `stream`, resume the rings (with the
    /// queue pairs the driver enabled) and bring the link back up.
    fn reconnect_backend(&mut self, stream: UnixStream) -> Result<(), VhostUserError> {
        self.backend_mut().backend.reconnect(stream)?;
        if self.backend_mut().set_link(true) {
            self.notify_config_changed();
        }
        Ok(())
    }

    /// The backend will not come back: transmitted frames are dropped, the link stays down.
    fn fail_backend(&mut self) {
        self.backend_mut()
            .backend
            .fail(Arc::new(super::failed::NetDrop));
        if self.backend_mut().set_link(false) {
            self.notify_config_changed();
        }
    }
}

/// Creates one virtio-net PCI device per NIC: negotiates with its backend on the matching
/// socket, builds the transport, plugs it into `pci` and registers its notify ioeventfds.
pub fn attach_nics(
    vm: Arc<dyn VmEventFds>,
    router: &Arc<GsiRouter>,
    mem: &GuestMemoryMmap,
    pci: &Mutex<PciRoot>,
    nics: &[NetConfig],
    sockets: Vec<UnixStream>,
) -> Result<Vec<NetPciDevice>, NetError> {
    if nics.len() != sockets.len() {
        return Err(NetError::Count {
            nics: nics.len(),
            sockets: sockets.len(),
        });
    }
    nics.iter()
        .zip(sockets)
        .map(|(nic, socket)| attach_nic(Arc::clone(&vm), router, mem, pci, nic, socket))
        .collect()
}

/// Creates one virtio-net PCI device (see [`attach_nics`]).
pub fn attach_nic(
    vm: Arc<dyn VmEventFds>,
    router: &Arc<GsiRouter>,
    mem: &GuestMemoryMmap,
    pci: &Mutex<PciRoot>,
    nic: &NetConfig,
    socket: UnixStream,
) -> Result<NetPciDevice, NetError> {
    let id = || nic.id.clone();
    if nic.queue_pairs == 0 || nic.queue_pairs > MAX_QUEUE_PAIRS {
        return Err(NetError::Pairs {
            id: id(),
            pairs: nic.queue_pairs,
        });
    }
    let label = format!("virtio-net {}", nic.id);
    let backend = VhostUserDevice::connect(
        socket,
        VhostUserParams {
            label: label.clone(),
            queues: usize::from(nic.queue_pairs) * 2,
            max_queue_size: MAX_QUEUE_SIZE,
            config_len: 0,
            policy: Box::new(NoBackendConfig),
            timeout: super::vhost_user::SOCKET_TIMEOUT,
        },
        mem.clone(),
    )
    .map_err(|source| NetError::Negotiate { id: id(), source })?;
    let queues = backend.num_queues();
    if queues % 2 != 0 {
        return Err(NetError::OddQueues { id: id(), queues });
    }
    let device = NetDevice::new(label.clone(), backend, mem.clone(), nic);
    let transport = VirtioPciDevice::new(
        &DeviceInfo {
            label,
            device_type: VIRTIO_ID_NET,
            class: CLASS_NETWORK,
            subclass: SUBCLASS_ETHERNET,
        },
        device,
        vm,
        Arc::clone(router),
    )
    .map_err(|source| NetError::Transport { id: id(), source })?;
    let dev = Arc::new(Mutex::new(transport));
    let slot = pci
        .lock()
        .expect("PCI root lock poisoned")
        .add_device(dev.clone())
        .map_err(|source| NetError::Pci { id: id(), source })?;
    {
        let mut d = dev.lock().expect("virtio device lock poisoned");
        d.register_notifiers()
            .map_err(|source| NetError::Transport { id: id(), source })?;
        tracing::info!(nic = %nic.id, slot,
            bar0 = format_args!("{:#x}", crate::devices::PciDevice::config(&*d).bar_addr(0)),
            pairs = d.backend().pairs,
            mac = %format_mac(&nic.mac),
            "virtio-net device plugged");
    }
    Ok(dev)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = CORE_FEATURES | bit(vn::VIRTIO_NET_F_MQ);

    #[test]
    fn rx_mode_commands() {
        assert_eq!(
            parse_ctrl(&[0, 0, 1], ALL, 2),
            Ok(CtrlCommand::Promisc(true))
        );
        assert_eq!(
            parse_ctrl(&[0, 1, 0], ALL, 2),
            Ok(CtrlCommand::AllMulti(false))
        );
        assert!(matches!(
            parse_ctrl(&[0, 0], ALL, 2),
            Err(CtrlError::Length { len: 0, .. })
        ));
        // ALLUNI needs CTRL_RX_EXTRA, which is not offered.
        assert_eq!(
            parse_ctrl(&[0, 2, 1], ALL, 2),
            Err(CtrlError::Unsupported {
                class: 0,
                command: 2
            })
        );
        // Without CTRL_RX negotiated nothing of class 0 is accepted.
        assert!(matches!(
            parse_ctrl(&[0, 0, 1], 0, 2),
            Err(CtrlError::Unsupported { .. })
        ));
    }

    #[test]
    fn mac_table_and_address() {
        let mut cmd = vec![1, 0];
        cmd.extend_from_slice(&1u32.to_le_bytes());
        cmd.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        cmd.extend_from_slice(&2u32.to_le_bytes());
        cmd.extend_from_slice(&[1, 0, 0x5e, 0, 0, 1, 0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(
            parse_ctrl(&cmd, ALL, 1),
            Ok(CtrlCommand::MacTable {
                unicast: vec![[2, 0, 0, 0, 0, 1]],
                multicast: vec![[1, 0, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]],
            })
        );
        // A table claiming more entries than were sent.
        let mut short = vec![1, 0];
        short.extend_from_slice(&5u32.to_le_bytes());
        short.extend_from_slice(&[0; 6]);
        assert!(matches!(
            parse_ctrl(&short, ALL, 1),
            Err(CtrlError::MacTable { entries: 5, .. })
        ));
        // Absurd entry counts do not overflow.
        let mut huge = vec![1, 0];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_ctrl(&huge, ALL, 1).is_err());
        assert_eq!(
            parse_ctrl(&[1, 1, 2, 3, 4, 5, 6, 7], ALL, 1),
            Ok(CtrlCommand::MacAddr([2, 3, 4, 5, 6, 7]))
        );
        assert!(parse_ctrl(&[1, 1, 2, 3], ALL, 1).is_err());
    }

    #[test]
    fn queue_pairs_are_bounded() {
        assert_eq!(
            parse_ctrl(&[4, 0, 2, 0], ALL, 2),
            Ok(CtrlCommand::QueuePairs(2))
        );
        assert_eq!(
            parse_ctrl(&[4, 0, 3, 0], ALL, 2),
            Err(CtrlError::Pairs { pairs: 3, max: 2 })
        );
        assert_eq!(
            parse_ctrl(&[4, 0, 0, 0], ALL, 2),
            Err(CtrlError::Pairs { pairs: 0, max: 2 })
        );
        assert!(matches!(
            parse_ctrl(&[4, 0, 2, 0], CORE_FEATURES, 2),
            Err(CtrlError::Unsupported { .. })
        ));
        assert_eq!(parse_ctrl(&[4], ALL, 2), Err(CtrlError::NoHeader));
    }

    #[test]
    fn mac_format() {
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            "52:54:00:12:34:56"
        );
    }
}
