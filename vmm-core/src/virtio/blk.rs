//! virtio-blk: one virtio-pci device per disk, its queues run by a vhost-user backend
//! (dev-blk, or any other: qemu-storage-daemon's `vhost-user-blk` export works too).

#![forbid(unsafe_code)]

use super::VmEventFds;
use super::pci::{DeviceInfo, TransportError, VirtioPciDevice};
use super::vhost_user::{ConfigPolicy, VhostUserDevice, VhostUserError, VhostUserParams};
use crate::devices::PciRoot;
use crate::devices::pci::PciError;
use crate::irq_routing::GsiRouter;
use crate::memory::GuestMemoryMmap;
use ipc::control::DiskConfig;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

/// virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u16 = 2;
/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_LEN: u32 = 60;
/// Queue size limit offered to the driver (dev-blk's maximum; vhost-user cannot ask).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// PCI class: mass storage, SCSI subclass, as QEMU's virtio-blk-pci.
const CLASS_STORAGE: u8 = 0x01;
const SUBCLASS_SCSI: u8 = 0x00;

/// Config-space fields the core cares about.
const CONFIG_WRITEBACK: u32 = 32;
const CONFIG_NUM_QUEUES: usize = 34;
/// `VIRTIO_BLK_F_CONFIG_WCE`: `writeback` is writable.
const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;

/// Errors of creating the disks.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("{disks} disk configurations but {sockets} backend sockets")]
    Count { disks: usize, sockets: usize },
    #[error("disk {id}: cannot negotiate with its vhost-user backend")]
    Negotiate {
        id: String,
        #[source]
        source: VhostUserError,
    },
    #[error("disk {id}: cannot build its virtio-pci transport")]
    Transport {
        id: String,
        #[source]
        source: TransportError,
    },
    #[error("disk {id}: cannot plug it into PCI bus 0")]
    Pci {
        id: String,
        #[source]
        source: PciError,
    },
}

/// The virtio-blk view of the config space.
struct BlkConfig;

impl ConfigPolicy for BlkConfig {
    fn fixup(&self, config: &mut [u8], num_queues: usize) {
        // The driver sizes its queue set from `num_queues` (with VIRTIO_BLK_F_MQ): never more
        // than the transport has.
        if let Some(field) = config.get_mut(CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2) {
            let have = u16::from_le_bytes([field[0], field[1]]);
            let offered = u16::try_from(num_queues).unwrap_or(u16::MAX);
            if have > offered {
                field.copy_from_slice(&offered.to_le_bytes());
            }
        }
    }

    fn writable(&self, offset: u32, len: usize, features: u64) -> bool {
        offset == CONFIG_WRITEBACK && len == 1 && features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0
    }
}

/// A disk on the PCI bus.
pub type BlkDevice = Arc<Mutex<VirtioPciDevice<VhostUserDevice>>>;

/// Creates one virtio-blk PCI device per disk: negotiates with its backend on the matching
/// socket, builds the transport, plugs it into `pci` and registers its notify ioeventfds.
pub fn attach_disks(
    vm: Arc<dyn VmEventFds>,
    router: &Arc<GsiRouter>,
    mem: &GuestMemoryMmap,
    pci: &Mutex<PciRoot>,
    disks: &[DiskConfig],
    sockets: Vec<UnixStream>,
) -> Result<Vec<BlkDevice>, BlkError> {
    if disks.len() != sockets.len() {
        return Err(BlkError::Count {
            disks: disks.len(),
            sockets: sockets.len(),
        });
    }
    disks
        .iter()
        .zip(sockets)
        .map(|(disk, socket)| attach_disk(Arc::clone(&vm), router, mem, pci, disk, socket))
        .collect()
}

/// Creates one virtio-blk PCI device (see [`attach_disks`]).
pub fn attach_disk(
    vm: Arc<dyn VmEventFds>,
    router: &Arc<GsiRouter>,
    mem: &GuestMemoryMmap,
    pci: &Mutex<PciRoot>,
    disk: &DiskConfig,
    socket: UnixStream,
) -> Result<BlkDevice, BlkError> {
    let label = format!("virtio-blk {}", disk.id);
    let backend = VhostUserDevice::connect(
        socket,
        VhostUserParams {
            label: label.clone(),
            queues: usize::from(disk.queues.max(1)),
            max_queue_size: MAX_QUEUE_SIZE,
            config_len: CONFIG_LEN,
            policy: Box::new(BlkConfig),
            timeout: super::vhost_user::SOCKET_TIMEOUT,
        },
        mem.clone(),
    )
    .map_err(|source| BlkError::Negotiate {
        id: disk.id.clone(),
        source,
    })?;
    let transport = VirtioPciDevice::new(
        &DeviceInfo {
            label,
            device_type: VIRTIO_ID_BLOCK,
            class: CLASS_STORAGE,
            subclass: SUBCLASS_SCSI,
        },
        backend,
        vm,
        Arc::clone(router),
    )
    .map_err(|source| BlkError::Transport {
        id: disk.id.clone(),
        source,
    })?;
    let dev = Arc::new(Mutex::new(transport));
    let slot = pci
        .lock()
        .expect("PCI root lock poisoned")
        .add_device(dev.clone())
        .map_err(|source| BlkError::Pci {
            id: disk.id.clone(),
            source,
        })?;
    {
        let mut d = dev.lock().expect("virtio device lock poisoned");
        d.register_notifiers()
            .map_err(|source| BlkError::Transport {
                id: disk.id.clone(),
                source,
            })?;
        tracing::info!(disk = %disk.id, slot,
            bar0 = format_args!("{:#x}", crate::devices::PciDevice::config(&*d).bar_addr(0)),
            queues = crate::virtio::VirtioBackend::num_queues(d.backend()),
            "virtio-blk device plugged");
    }
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num_queues_is_capped_to_the_transport() {
        let mut cfg = vec![0u8; 60];
        cfg[34..36].copy_from_slice(&4u16.to_le_bytes());
        BlkConfig.fixup(&mut cfg, 2);
        assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 2);
        BlkConfig.fixup(&mut cfg, 8);
        assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 2, "never raised");
        let mut short = vec![0u8; 20];
        BlkConfig.fixup(&mut short, 1);
        assert_eq!(short, vec![0u8; 20]);
    }

    #[test]
    fn only_writeback_is_writable_and_only_with_config_wce() {
        let wce = 1u64 << VIRTIO_BLK_F_CONFIG_WCE;
        assert!(BlkConfig.writable(32, 1, wce));
        assert!(!BlkConfig.writable(32, 1, 0));
        assert!(!BlkConfig.writable(32, 2, wce));
        assert!(!BlkConfig.writable(0, 8, wce));
    }
}
