//! virtio devices: the virtio-pci modern transport and the vhost-user frontend behind it.
//!
//! - [`pci`]: [`VirtioPciDevice`](pci::VirtioPciDevice), the transport (common, notify, ISR
//!   and device-config regions in BAR0, MSI-X, the vendor capabilities). Queue notifies are
//!   ioeventfds, MSI-X vectors are irqfds on GSI routes, so running queues never exit to the
//!   core.
//! - [`msix`]: the MSI-X table and capability model.
//! - [`vhost_user`]: [`VhostUserDevice`](vhost_user::VhostUserDevice), a [`VirtioBackend`]
//!   that drives a vhost-user backend process with the `vhost` crate's frontend.
//! - [`blk`]: virtio-blk glue: one PCI device per disk socket.
//! - [`net`]: virtio-net: data queues in a vhost-user backend, the control queue in the core.
//!
//! The transport talks to what runs the queues through [`VirtioBackend`] and to KVM through
//! [`VmEventFds`] and [`GsiRouter`](crate::irq_routing::GsiRouter), so it is tested without
//! either.

pub mod blk;
pub mod failed;
pub mod msix;
pub mod net;
pub mod pci;
pub mod vhost_user;

#[cfg(test)]
mod tests;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: the modern interface; required.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits the transport acts on (virtio 1.2 §2.1).
pub mod status {
    pub const DRIVER_OK: u8 = 0x04;
    pub const FEATURES_OK: u8 = 0x08;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// A virtqueue as the driver configured it: guest-physical ring addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub index: u16,
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Driver area (available ring).
    pub avail: u64,
    /// Device area (used ring).
    pub used: u64,
}

/// One queue handed to [`VirtioBackend::activate`]: its rings and its eventfds.
pub struct ActiveQueue<'a> {
    pub config: QueueConfig,
    /// Signalled on every guest notify of this queue (a KVM ioeventfd).
    pub kick: &'a EventFd,
    /// Written by the backend to interrupt the guest (the irqfd of the queue's MSI-X vector, or
    /// an eventfd nobody reads when the queue has no vector).
    pub call: &'a EventFd,
}

/// What runs a device's queues: the device half behind a virtio transport.
///
/// The transport masks [`device_features`](Self::device_features) further before offering
/// them, caches nothing itself, and never propagates the backend's errors to a vCPU: it logs
/// them and sets `DEVICE_NEEDS_RESET` where the spec says so.
pub trait VirtioBackend: Send {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The virtio feature bits the device supports.
    fn device_features(&self) -> u64;
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// Largest queue size per queue.
    fn max_queue_size(&self) -> u16;
    /// The device-specific config space, as the guest reads it.
    fn config(&self) -> &[u8];
    /// A guest write to the config space; `Ok(true)` if [`config`](Self::config) changed.
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<bool, Self::Error>;
    /// DRIVER_OK: start `queues` (the enabled ones) with the driver's `features`.
    fn activate(&mut self, features: u64, queues: &[ActiveQueue<'_>]) -> Result<(), Self::Error>;
    /// Device reset: stop whatever [`activate`](Self::activate) started.
    fn reset(&mut self) -> Result<(), Self::Error>;

    /// Whether the core itself runs queue `queue` (virtio-net's control queue): its notifies
    /// then trap to the core (no ioeventfd) and arrive at [`queue_notify`](Self::queue_notify).
    fn serves_queue(&self, _queue: usize) -> bool {
        false
    }

    /// A guest notify of a queue [`serves_queue`](Self::serves_queue) claims, on the vCPU
    /// thread that wrote it. Returns whether the config space changed.
    fn queue_notify(&mut self, _queue: usize) -> bool {
        false
    }
}

/// The KVM eventfd plumbing of a transport: `VmFd`, or a recorder in tests.
pub trait VmEventFds: Send + Sync {
    /// Signals `evt` on any guest write to MMIO address `addr` (any width, no datamatch).
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error>;
    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error>;
    /// Injects GSI `gsi` whenever `evt` is written.
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
    fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error>;
}

impl VmEventFds for VmFd {
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_ioevent(self, evt, &IoEventAddress::Mmio(addr), NoDatamatch)
    }
    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
        VmFd::unregister_ioevent(self, evt, &IoEventAddress::Mmio(addr), NoDatamatch)
    }
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_irqfd(self, evt, gsi)
    }
    fn unregister_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::unregister_irqfd(self, evt, gsi)
    }
}

/// The VM's vhost-user devices by id (`disk0`, `net0`, ...), for the launcher's restart
/// messages (`ipc::control::LauncherToCore::{DeviceDown, Reconnect, DeviceFailed}`).
#[derive(Default)]
pub struct Devices {
    blk: Vec<(String, blk::BlkDevice)>,
    net: Vec<(String, net::NetPciDevice)>,
}

/// What the launcher can ask of a device.
pub enum DeviceRequest {
    Down,
    Reconnect(std::os::unix::net::UnixStream),
    Fail,
}

impl Devices {
    pub fn new(
        blk: impl IntoIterator<Item = (String, blk::BlkDevice)>,
        net: impl IntoIterator<Item = (String, net::NetPciDevice)>,
    ) -> Self {
        Self {
            blk: blk.into_iter().collect(),
            net: net.into_iter().collect(),
        }
    }

    /// Carries out `request` on device `id`; the error is a sentence for the launcher.
    pub fn handle(&self, id: &str, request: DeviceRequest) -> Result<(), String> {
        if let Some((_, dev)) = self.blk.iter().find(|(i, _)| i == id) {
            return apply(
                &mut *dev.lock().expect("virtio device lock poisoned"),
                request,
            );
        }
        if let Some((_, dev)) = self.net.iter().find(|(i, _)| i == id) {
            return apply(
                &mut *dev.lock().expect("virtio device lock poisoned"),
                request,
            );
        }
        Err(format!("no vhost-user device {id}"))
    }
}

/// What a vhost-user device does when its backend process dies, comes back or is given up.
pub trait Restartable {
    fn backend_down(&mut self);
    fn reconnect_backend(
        &mut self,
        stream: std::os::unix::net::UnixStream,
    ) -> Result<(), vhost_user::VhostUserError>;
    fn fail_backend(&mut self);
}

fn apply(dev: &mut impl Restartable, request: DeviceRequest) -> Result<(), String> {
    match request {
        DeviceRequest::Down => dev.backend_down(),
        DeviceRequest::Reconnect(stream) => dev
            .reconnect_backend(stream)
            .map_err(|e| crate::error_chain(&e))?,
        DeviceRequest::Fail => dev.fail_backend(),
    }
    Ok(())
}
