//! Tests of the virtio-pci transport and the vhost-user frontend.
//!
//! - `transport`: the register model driven as Linux's `virtio_pci_modern` does, against a
//!   recording backend and a recording VM (no KVM);
//! - `vhost_user`: real vhost-user exchanges with an in-process `vhost-user-backend` daemon
//!   over a UNIX socket, memfd guest RAM and hand-built split rings;
//! - `kvm`: the same transport on a real KVM VM (routing table, irqfds, ioeventfds).

mod kvm;
mod net;
mod transport;
mod vhost_user;

use super::pci::{DeviceInfo, VirtioPciDevice};
use super::{ActiveQueue, QueueConfig, VirtioBackend, VmEventFds};
use crate::devices::PciDevice;
use crate::irq_routing::GsiRouter;
use crate::irq_routing::tests::RecordingTable;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// What the transport asked of KVM, by eventfd number.
#[derive(Default)]
pub(super) struct RecordingVm {
    pub ioevents: Mutex<Vec<(RawFd, u64)>>,
    pub irqfds: Mutex<Vec<(RawFd, u32)>>,
}

impl VmEventFds for RecordingVm {
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        let mut v = self.ioevents.lock().unwrap();
        if v.iter().any(|&(_, a)| a == addr) {
            return Err(kvm_ioctls::Error::new(libc::EEXIST));
        }
        v.push((evt.as_raw_fd(), addr));
        Ok(())
    }
    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        let mut v = self.ioevents.lock().unwrap();
        let i = v
            .iter()
            .position(|&e| e == (evt.as_raw_fd(), addr))
            .ok_or(kvm_ioctls::Error::new(libc::ENOENT))?;
        v.remove(i);
        Ok(())
    }
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        let mut v = self.irqfds.lock().unwrap();
        if v.contains(&(evt.as_raw_fd(), gsi)) {
            return Err(kvm_ioctls::Error::new(libc::EBUSY));
        }
        v.push((evt.as_raw_fd(), gsi));
        Ok(())
    }
    fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        let mut v = self.irqfds.lock().unwrap();
        let i = v
            .iter()
            .position(|&e| e == (evt.as_raw_fd(), gsi))
            .ok_or(kvm_ioctls::Error::new(libc::ENOENT))?;
        v.remove(i);
        Ok(())
    }
}

/// What the transport asked of the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Call {
    Activate {
        features: u64,
        queues: Vec<QueueConfig>,
        kicks: Vec<RawFd>,
        calls: Vec<RawFd>,
    },
    Reset,
    WriteConfig(u32, Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
#[error("the fake backend refuses")]
pub(super) struct Refused;

/// A backend that records its calls.
pub(super) struct FakeBackend {
    pub features: u64,
    pub queues: usize,
    pub config: Vec<u8>,
    pub calls: Arc<Mutex<Vec<Call>>>,
    pub refuse_activate: bool,
}

impl VirtioBackend for FakeBackend {
    type Error = Refused;
    fn device_features(&self) -> u64 {
        self.features
    }
    fn num_queues(&self) -> usize {
        self.queues
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn config(&self) -> &[u8] {
        &self.config
    }
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<bool, Refused> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::WriteConfig(offset, data.to_vec()));
        let start = usize::try_from(offset).unwrap();
        self.config[start..start + data.len()].copy_from_slice(data);
        Ok(true)
    }
    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), Refused> {
        self.calls.lock().unwrap().push(Call::Activate {
            features,
            queues: queues.iter().map(|q| q.config).collect(),
            kicks: queues.iter().map(|q| q.kick.as_raw_fd()).collect(),
            calls: queues.iter().map(|q| q.call.as_raw_fd()).collect(),
        });
        if self.refuse_activate {
            Err(Refused)
        } else {
            Ok(())
        }
    }
    fn reset(&mut self) -> Result<(), Refused> {
        self.calls.lock().unwrap().push(Call::Reset);
        Ok(())
    }
}

/// Features a virtio-blk backend might report: VERSION_1, SEG_MAX, BLK_SIZE, FLUSH, MQ,
/// EVENT_IDX, INDIRECT_DESC, vhost-user's bit 30, and bits the transport must hide
/// (ACCESS_PLATFORM 33, RING_PACKED 34, IN_ORDER 35, NOTIFICATION_DATA 38, RING_RESET 40).
pub(super) const BACKEND_FEATURES: u64 = (1 << 32)
    | (1 << 2)
    | (1 << 6)
    | (1 << 9)
    | (1 << 12)
    | (1 << 29)
    | (1 << 28)
    | (1 << 30)
    | (1 << 33)
    | (1 << 34)
    | (1 << 35)
    | (1 << 38)
    | (1 << 40);

/// Where the tests place BAR0.
pub(super) const BAR: u64 = 0xc000_0000;

pub(super) struct Rig<B: VirtioBackend> {
    pub dev: VirtioPciDevice<B>,
    pub vm: Arc<RecordingVm>,
    pub table: Arc<RecordingTable>,
    pub router: Arc<GsiRouter>,
}

pub(super) fn rig<B: VirtioBackend>(backend: B) -> Rig<B> {
    let vm = Arc::new(RecordingVm::default());
    let table = Arc::new(RecordingTable::default());
    let router = Arc::new(GsiRouter::new(table.clone()));
    let mut dev = VirtioPciDevice::new(
        &DeviceInfo {
            label: "virtio-blk test".into(),
            device_type: 2,
            class: 0x01,
            subclass: 0x00,
        },
        backend,
        vm.clone(),
        router.clone(),
    )
    .unwrap();
    dev.config_mut().set_bar_addr(0, BAR).unwrap();
    dev.register_notifiers().unwrap();
    Rig {
        dev,
        vm,
        table,
        router,
    }
}

pub(super) fn fake(queues: usize) -> (FakeBackend, Arc<Mutex<Vec<Call>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut config = vec![0u8; 60];
    config[0..8].copy_from_slice(&0x1234_5678u64.to_le_bytes());
    config[56..60].fill(0xff);
    (
        FakeBackend {
            features: BACKEND_FEATURES,
            queues,
            config,
            calls: calls.clone(),
            refuse_activate: false,
        },
        calls,
    )
}

/// Guest-side register helpers, the way a driver reaches BAR0 and config space.
pub(super) trait Guest {
    fn rd(&mut self, off: u64, len: usize) -> u64;
    fn wr(&mut self, off: u64, len: usize, v: u64);
    fn cfg_rd(&mut self, off: usize, len: usize) -> u32;
    fn cfg_wr(&mut self, off: usize, len: usize, v: u32);
}

impl<T: PciDevice> Guest for T {
    fn rd(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn wr(&mut self, off: u64, len: usize, v: u64) {
        self.write_bar(0, off, &v.to_le_bytes()[..len]);
    }
    fn cfg_rd(&mut self, off: usize, len: usize) -> u32 {
        let reg = self.read_config_register(off / 4);
        let shift = 8 * (off % 4);
        let mask = if len == 4 {
            u32::MAX
        } else {
            (1u32 << (8 * len)) - 1
        };
        (reg >> shift) & mask
    }
    fn cfg_wr(&mut self, off: usize, len: usize, v: u32) {
        self.write_config_register(
            off / 4,
            u64::try_from(off % 4).unwrap(),
            &v.to_le_bytes()[..len],
        );
    }
}

/// Common-config offsets, as Linux's `struct virtio_pci_common_cfg`.
pub(super) mod cc {
    pub const DFSELECT: u64 = 0x00;
    pub const DF: u64 = 0x04;
    pub const GFSELECT: u64 = 0x08;
    pub const GF: u64 = 0x0c;
    pub const MSIX: u64 = 0x10;
    pub const NUMQ: u64 = 0x12;
    pub const STATUS: u64 = 0x14;
    pub const CFGGEN: u64 = 0x15;
    pub const Q_SELECT: u64 = 0x16;
    pub const Q_SIZE: u64 = 0x18;
    pub const Q_MSIX: u64 = 0x1a;
    pub const Q_ENABLE: u64 = 0x1c;
    pub const Q_NOFF: u64 = 0x1e;
    pub const Q_DESCLO: u64 = 0x20;
    pub const Q_DESCHI: u64 = 0x24;
    pub const Q_AVAILLO: u64 = 0x28;
    pub const Q_USEDLO: u64 = 0x30;
}

/// Linux's feature negotiation: read both device feature windows, ack `want & offered`,
/// set FEATURES_OK and read it back.
pub(super) fn negotiate(dev: &mut impl Guest, want: u64) -> u8 {
    dev.wr(cc::STATUS, 1, 1);
    dev.wr(cc::STATUS, 1, 3);
    dev.wr(cc::DFSELECT, 4, 0);
    let lo = dev.rd(cc::DF, 4);
    dev.wr(cc::DFSELECT, 4, 1);
    let hi = dev.rd(cc::DF, 4);
    let ack = (lo | (hi << 32)) & want;
    dev.wr(cc::GFSELECT, 4, 0);
    dev.wr(cc::GF, 4, ack & 0xffff_ffff);
    dev.wr(cc::GFSELECT, 4, 1);
    dev.wr(cc::GF, 4, ack >> 32);
    dev.wr(cc::STATUS, 1, 0xb);
    u8::try_from(dev.rd(cc::STATUS, 1)).unwrap()
}

/// Linux's queue setup (`vp_modern_setup_vq` then `queue_enable`): size, rings, vector
/// (read back), enable.
pub(super) fn setup_queue(dev: &mut impl Guest, q: u16, size: u16, base: u64, vector: u16) -> u16 {
    dev.wr(cc::Q_SELECT, 2, u64::from(q));
    dev.wr(cc::Q_SIZE, 2, u64::from(size));
    dev.wr(cc::Q_DESCLO, 4, base & 0xffff_ffff);
    dev.wr(cc::Q_DESCHI, 4, base >> 32);
    dev.wr(cc::Q_AVAILLO, 8, base + 0x1000);
    dev.wr(cc::Q_USEDLO, 8, base + 0x2000);
    dev.wr(cc::Q_MSIX, 2, u64::from(vector));
    let v = u16::try_from(dev.rd(cc::Q_MSIX, 2)).unwrap();
    dev.wr(cc::Q_ENABLE, 2, 1);
    v
}

/// Linux's MSI-X bring-up (`msix_capability_init` and `request_irq`): enable with the
/// function masked, program entries, unmask the function, unmask each vector.
pub(super) fn enable_msix(dev: &mut (impl Guest + PciDevice), vectors: &[(u16, u64, u32)]) {
    let cap = dev
        .config()
        .capabilities()
        .into_iter()
        .find(|&(_, id)| id == 0x11)
        .unwrap()
        .0;
    dev.cfg_wr(cap + 2, 2, 0xc000);
    for &(v, addr, data) in vectors {
        let e = 0x8000 + 16 * u64::from(v);
        dev.wr(e, 4, addr & 0xffff_ffff);
        dev.wr(e + 4, 4, addr >> 32);
        dev.wr(e + 8, 4, u64::from(data));
    }
    dev.cfg_wr(cap + 2, 2, 0x8000);
    for &(v, _, _) in vectors {
        dev.wr(0x8000 + 16 * u64::from(v) + 12, 4, 0);
    }
}
