//! Launcher <-> core control channel: one closed enum per direction.
//!
//! The launcher creates a `SOCK_SEQPACKET` socketpair, keeps one end and hands the other to
//! `vmm-core` as its only inherited descriptor besides stdio (at [`CORE_CONTROL_FD`]). Every
//! other descriptor the core uses arrives attached to a message here, so the core never opens a
//! path.

use crate::channel::Channel;
use serde::{Deserialize, Serialize};

/// The descriptor number at which `vmm-core` finds its control socket.
pub const CORE_CONTROL_FD: i32 = 3;

/// The launcher's end of the control channel.
pub type LauncherChannel = Channel<LauncherToCore, CoreToLauncher>;
/// The core's end of the control channel.
pub type CoreChannel = Channel<CoreToLauncher, LauncherToCore>;

/// Messages from the launcher to the core.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LauncherToCore {
    /// Build and run the VM. Sent once, first. Attached descriptors, in this order:
    /// 1. `/dev/kvm`, opened read-write by the launcher (the core cannot open paths);
    /// 2. the guest-RAM memfd, created and sized by the launcher, sealed against shrink and grow
    ///    so that no process it is shared with can truncate it under the core's mapping;
    /// 3. the kernel image, opened read-only;
    /// 4. the initramfs, opened read-only, only if [`VmConfig::has_initramfs`];
    /// 5. the console: a connected `SOCK_STREAM` socket whose other end the launcher pumps to
    ///    its own stdin/stdout, so the core never touches the user's terminal;
    /// 6. one connected vhost-user socket per entry of [`VmConfig::disks`], in order; the
    ///    launcher connected it to the listening socket it owns and gave the device process;
    /// 7. one connected vhost-user socket per entry of [`VmConfig::nets`], in order, made the
    ///    same way (the tap descriptors go to the net device process, never to the core).
    Start(VmConfig),
    /// Stop the VM now (the launcher got SIGINT/SIGTERM); the core answers with
    /// [`CoreToLauncher::Exited`] carrying [`ExitReason::Stopped`].
    Shutdown,
    /// The process behind `device` (a [`DiskConfig::id`] or [`NetConfig::id`]) died; a new
    /// one is being started. The core drops the connection (notifies keep accumulating in the
    /// kick eventfds) and shows a network card's link as down.
    DeviceDown { device: String },
    /// The process behind `device` died and was started again. Attached: one connected vhost-user socket, made like those of `Start`
    /// (the launcher connected it to the listening socket it owns, which the new incarnation
    /// accepts on). The core replays the device's setup on it and resumes its rings; it
    /// answers with [`CoreToLauncher::Reconnected`].
    Reconnect { device: String },
    /// `device` exhausted its restart budget and will not come back: the core completes its
    /// outstanding and future requests with errors (block: `VIRTIO_BLK_S_IOERR`; network:
    /// transmitted frames dropped, link down), so the guest sees a failed device, not a hang.
    DeviceFailed { device: String },
}

/// What the core needs to build the VM; every path was resolved by the launcher.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Number of vCPUs (validated by the launcher against KVM's limits).
    pub cpus: u32,
    /// Guest RAM in bytes; equals the memfd's size.
    pub memory_bytes: u64,
    /// Kernel command line.
    pub cmdline: String,
    /// Whether an initramfs descriptor is attached.
    pub has_initramfs: bool,
    /// vhost-user block devices, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// vhost-user network cards, in PCI slot order after the disks.
    pub nets: Vec<NetConfig>,
}

/// A virtio-net device whose receive and transmit queues run in a vhost-user backend; the core
/// serves its config space and control queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Name used in logs (for example `net0`).
    pub id: String,
    /// The MAC address the guest sees.
    pub mac: [u8; 6],
    /// Receive/transmit queue pairs (the backend runs twice as many queues).
    pub queue_pairs: u16,
    /// The MTU to advertise (`VIRTIO_NET_F_MTU`), normally the tap's.
    pub mtu: Option<u16>,
}

/// A virtio-blk device whose backend is reached over vhost-user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Name used in logs (for example `disk0`).
    pub id: String,
    /// Number of request queues to offer the guest (capped by what the backend reports).
    pub queues: u16,
}

/// Messages from the core to the launcher.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoreToLauncher {
    /// The VM is built and its vCPUs run.
    Running,
    /// The VM has ended; the core exits right after sending this.
    Exited(ExitReason),
    /// The answer to [`LauncherToCore::Reconnect`]: `error` is `None` when the device runs
    /// again on the new connection.
    Reconnected {
        device: String,
        error: Option<String>,
    },
}

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, port 0xcf9, i8042 0xfe).
    Reboot,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN) or KVM could not run guest code.
    GuestCrash(String),
    /// The launcher asked the core to stop.
    Stopped,
    /// The VMM itself failed.
    Internal(String),
}

/// Process exit codes of `atoll run`, one per way a VM can end.
pub mod exit_code {
    /// The guest powered off.
    pub const POWER_OFF: i32 = 0;
    /// atoll failed internally (the core died or reported an error).
    pub const INTERNAL: i32 = 1;
    /// Bad command line or bad input file.
    pub const USAGE: i32 = 2;
    /// The guest rebooted.
    pub const REBOOT: i32 = 3;
    /// The guest crashed: triple fault or a KVM internal error.
    pub const GUEST_CRASH: i32 = 4;
    /// Stopped by a signal to the launcher.
    pub const STOPPED: i32 = 130;
}

impl ExitReason {
    /// The exit code `atoll run` reports for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::PowerOff => exit_code::POWER_OFF,
            Self::Reboot => exit_code::REBOOT,
            Self::GuestCrash(_) => exit_code::GUEST_CRASH,
            Self::Stopped => exit_code::STOPPED,
            Self::Internal(_) => exit_code::INTERNAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_round_trips_over_the_channel() {
        let (launcher, core_raw) = LauncherChannel::pair().unwrap();
        let core = CoreChannel::from_fd(core_raw);
        let cfg = VmConfig {
            cpus: 2,
            memory_bytes: 512 << 20,
            cmdline: "console=ttyS0".into(),
            has_initramfs: true,
            disks: vec![DiskConfig {
                id: "disk0".into(),
                queues: 1,
            }],
            nets: vec![NetConfig {
                id: "net0".into(),
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                queue_pairs: 2,
                mtu: Some(1500),
            }],
        };
        launcher
            .send(&LauncherToCore::Start(cfg.clone()), &[])
            .unwrap();
        assert_eq!(core.recv().unwrap().0, LauncherToCore::Start(cfg));
        core.send(&CoreToLauncher::Exited(ExitReason::Reboot), &[])
            .unwrap();
        let (msg, _) = launcher.recv().unwrap();
        assert_eq!(msg, CoreToLauncher::Exited(ExitReason::Reboot));
    }

    #[test]
    fn exit_codes_are_distinct() {
        let mut codes = [
            ExitReason::PowerOff.exit_code(),
            ExitReason::Reboot.exit_code(),
            ExitReason::GuestCrash(String::new()).exit_code(),
            ExitReason::Stopped.exit_code(),
            ExitReason::Internal(String::new()).exit_code(),
            exit_code::USAGE,
        ];
        codes.sort_unstable();
        assert!(codes.windows(2).all(|w| w[0] != w[1]));
    }
}
