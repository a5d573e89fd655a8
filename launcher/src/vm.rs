//! Running one VM: create guest RAM, wire the console and devices, start `vmm-core`, hand it
//! everything over the control channel, and wait for the VM to end.

#![forbid(unsafe_code)]

use crate::config::{Disk, RunConfig};
use crate::confine::{Confiner, Kind};
use crate::console::{ConsoleError, ConsolePumps, RawTerminal};
use crate::restart::Decision;
use crate::supervisor::{DEV_BLK, DEV_NET, Exited, Supervisor, SupervisorError, VMM_CORE};
use ipc::channel::ChannelError;
use ipc::control::{
    CoreToLauncher, DiskConfig, ExitReason, LauncherChannel, LauncherToCore, NetConfig, VmConfig,
    exit_code,
};
use memfd::{FileSeal, MemfdOptions};
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

/// How long the core has to confirm a requested stop before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the core has to exit after it reported the end of the VM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(2);
/// A stop request repeated within this time of the first is the same request delivered twice
/// (`timeout` and process-group kills signal both the process and its group), not an
/// insistence to kill at once.
const REPEAT_GRACE: Duration = Duration::from_secs(1);
/// How long the guest's last console output has to reach stdout.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors that keep a VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the guest RAM memfd of {0} bytes")]
    Memfd(u64, #[source] memfd::Error),
    #[error("cannot size the guest RAM memfd to {0} bytes")]
    MemfdSize(u64, #[source] io::Error),
    #[error("cannot seal the guest RAM memfd")]
    MemfdSeal(#[source] memfd::Error),
    #[error("cannot create the console socket pair")]
    ConsoleSocket(#[source] io::Error),
    #[error("cannot create the control channel")]
    Channel(#[source] ChannelError),
    #[error("cannot install the signal handlers")]
    Signals(#[source] io::Error),
    #[error("cannot start a thread")]
    Thread(#[source] io::Error),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error("cannot send the VM configuration to vmm-core")]
    SendStart(#[source] ChannelError),
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The exit code of `atoll run`.
    pub code: i32,
    /// A line for stderr, for every end but a power-off.
    pub summary: Option<String>,
}

impl Outcome {
    fn from_reason(reason: &ExitReason) -> Self {
        let summary = match reason {
            ExitReason::PowerOff => None,
            ExitReason::Reboot => Some("the guest rebooted".to_owned()),
            ExitReason::GuestCrash(detail) => Some(format!("the guest crashed: {detail}")),
            ExitReason::Stopped => Some("the VM was stopped".to_owned()),
            ExitReason::Internal(detail) => Some(format!("vmm-core failed: {detail}")),
        };
        Self {
            code: reason.exit_code(),
            summary,
        }
    }

    fn internal(summary: String) -> Self {
        Self {
            code: exit_code::INTERNAL,
            summary: Some(summary),
        }
    }

    fn stopped(summary: String) -> Self {
        Self {
            code: exit_code::STOPPED,
            summary: Some(summary),
        }
    }
}

/// What the main loop waits for.
#[derive(Debug)]
enum Event {
    /// A message from the core, or the channel's end.
    Core(Result<CoreToLauncher, ChannelError>),
    /// A signal to the launcher.
    Signal(i32),
    /// The user typed Ctrl-A x.
    ConsoleQuit,
}

/// Creates the guest RAM: a memfd of `bytes`, sealed against shrinking and growing (and
/// against changing its seals), so that no process it is shared with can truncate it under the
/// core's mapping.
pub fn create_guest_ram(bytes: u64) -> Result<memfd::Memfd, VmError> {
    let mfd = MemfdOptions::default()
        .allow_sealing(true)
        .close_on_exec(true)
        .create("atoll-guest-ram")
        .map_err(|e| VmError::Memfd(bytes, e))?;
    mfd.as_file()
        .set_len(bytes)
        .map_err(|e| VmError::MemfdSize(bytes, e))?;
    mfd.add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal])
        .map_err(VmError::MemfdSeal)?;
    Ok(mfd)
}

/// Runs the VM described by `config` until it ends.
pub fn run(config: RunConfig, confiner: Confiner) -> Result<Outcome, VmError> {
    let core_bin = VMM_CORE.locate()?;
    let dev_blk_bin = DEV_BLK.locate()?;
    let dev_net_bin = DEV_NET.locate()?;
    tracing::info!(
        kernel = %config.kernel_path.display(),
        kind = ?config.kernel_kind,
        cpus = config.cpus,
        memory = config.memory_bytes,
        disks = config.disks.len(),
        nics = config.nets.len(),
        "starting the VM"
    );
    let ram = create_guest_ram(config.memory_bytes)?;
    let (console, console_core) = UnixStream::pair().map_err(VmError::ConsoleSocket)?;
    let (control, control_core) = LauncherChannel::pair().map_err(VmError::Channel)?;
    let (events, event_rx) = mpsc::channel();

    // Handlers go in before any child exists so that no SIGCHLD is missed; signal-hook's
    // handlers are reset by exec, so children start with default dispositions.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGCHLD]).map_err(VmError::Signals)?;
    let signal_handle = signals.handle();
    let tx = events.clone();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if tx.send(Event::Signal(signal)).is_err() {
                    break;
                }
            }
        })
        .map_err(VmError::Thread)?;

    let mut supervisor = Supervisor::new(confiner);
    let mut disk_configs = Vec::with_capacity(config.disks.len());
    let mut disk_streams = Vec::with_capacity(config.disks.len());
    for disk in config.disks {
        disk_configs.push(DiskConfig {
            id: disk.id().to_owned(),
            queues: disk.queues(),
        });
        disk_streams.push(match disk {
            Disk::Image(disk) => supervisor.start_disk(disk, &dev_blk_bin)?,
            Disk::Socket(disk) => {
                tracing::info!(
                    device = %disk.id,
                    socket = %disk.spec.path.display(),
                    "using an external vhost-user backend"
                );
                disk.stream
            }
        });
    }
    let mut net_configs = Vec::with_capacity(config.nets.len());
    let mut net_streams = Vec::with_capacity(config.nets.len());
    for nic in config.nets {
        net_configs.push(NetConfig {
            id: nic.id.clone(),
            mac: nic.mac.0,
            queue_pairs: nic.queue_pairs(),
            mtu: nic.mtu,
        });
        net_streams.push(supervisor.start_nic(nic, &dev_net_bin)?);
    }
    let core_pid =
        supervisor.start_core(&core_bin, control_core, Kind::Core { cpus: config.cpus })?;

    let vm_config = VmConfig {
        cpus: config.cpus,
        memory_bytes: config.memory_bytes,
        cmdline: config.cmdline,
        has_initramfs: config.initramfs.is_some(),
        disks: disk_configs,
        nets: net_configs,
    };
    // The order documented on `LauncherToCore::Start`.
    let mut fds: Vec<BorrowedFd<'_>> = vec![
        config.kvm.as_fd(),
        ram.as_file().as_fd(),
        config.kernel.as_fd(),
    ];
    fds.extend(config.initramfs.as_ref().map(AsFd::as_fd));
    fds.push(console_core.as_fd());
    fds.extend(disk_streams.iter().map(AsFd::as_fd));
    fds.extend(net_streams.iter().map(AsFd::as_fd));
    tracing::debug!(?vm_config, fds = fds.len(), "sending Start");
    if let Err(e) = control.send(&LauncherToCore::Start(vm_config), &fds) {
        // Most likely the core died at once; if so, report how.
        return match supervisor.wait_core(EXIT_TIMEOUT) {
            Some(status) => Ok(Outcome::internal(format!("vmm-core died: {status}"))),
            None => Err(VmError::SendStart(e)),
        };
    }
    // The core holds its copies now; the launcher keeps none of guest RAM, the KVM device,
    // the kernel or the core's ends of the console and device connections.
    drop(fds);
    drop((ram, config.kvm, config.kernel, config.initramfs));
    drop((console_core, disk_streams, net_streams));

    let control = Arc::new(control);
    let reader = Arc::clone(&control);
    let tx = events.clone();
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            loop {
                let msg = reader.recv().map(|(msg, _fds)| msg);
                let last = matches!(msg, Ok(CoreToLauncher::Exited(_)) | Err(_));
                if tx.send(Event::Core(msg)).is_err() || last {
                    break;
                }
            }
        })
        .map_err(VmError::Thread)?;

    let raw_terminal = RawTerminal::enter()?;
    let tx = events.clone();
    let pumps = ConsolePumps::start(io::stdin(), console, raw_terminal.is_some(), move || {
        let _ = tx.send(Event::ConsoleQuit);
    })?;
    drop(events);

    let outcome = wait_for_end(&event_rx, &control, &mut supervisor, core_pid);

    if !pumps.drain(DRAIN_TIMEOUT) {
        tracing::debug!("console output did not drain in time");
    }
    drop(raw_terminal);
    signal_handle.close();
    supervisor.shutdown();
    Ok(outcome)
}

/// Starts the dead devices whose backoff has passed and hands the core a connection to each.
fn restart_devices(supervisor: &mut Supervisor, control: &LauncherChannel) {
    for (id, result) in supervisor.restart_due(Instant::now()) {
        let msg = match &result {
            Ok(_) => LauncherToCore::Reconnect { device: id },
            Err(_) => LauncherToCore::DeviceFailed { device: id },
        };
        let fds: Vec<BorrowedFd<'_>> = result.as_ref().map(|s| vec![s.as_fd()]).unwrap_or_default();
        if let Err(e) = control.send(&msg, &fds) {
            tracing::warn!("cannot send {msg:?} to vmm-core: {e}");
        }
    }
}

/// The main loop: waits for the core to report the end of the VM, handling signals and
/// children's deaths meanwhile.
fn wait_for_end(
    events: &mpsc::Receiver<Event>,
    control: &LauncherChannel,
    supervisor: &mut Supervisor,
    core_pid: u32,
) -> Outcome {
    // When the user asked to stop; the core then has STOP_TIMEOUT to confirm.
    let mut stop_requested: Option<Instant> = None;
    loop {
        let restart = supervisor.next_restart();
        let deadline = [stop_requested.map(|at| at + STOP_TIMEOUT), restart]
            .into_iter()
            .flatten()
            .min();
        let event = match deadline {
            None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => events.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        if matches!(event, Err(RecvTimeoutError::Timeout))
            && stop_requested.is_none_or(|at| at + STOP_TIMEOUT > Instant::now())
        {
            restart_devices(supervisor, control);
            continue;
        }
        let event = match event {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => {
                let status = supervisor.kill_core();
                return Outcome::stopped(format!(
                    "vmm-core (pid {core_pid}) did not stop within {}s and was killed{}",
                    STOP_TIMEOUT.as_secs(),
                    status.map(|s| format!(" ({s})")).unwrap_or_default()
                ));
            }
            Err(RecvTimeoutError::Disconnected) => {
                // Every sender is gone, which cannot happen while the signal thread runs.
                supervisor.kill_core();
                return Outcome::internal("lost track of vmm-core".to_owned());
            }
        };
        match event {
            Event::Core(Ok(CoreToLauncher::Running)) => {
                tracing::info!(pid = core_pid, "the VM is running");
            }
            Event::Core(Ok(CoreToLauncher::Reconnected { device, error })) => match error {
                None => tracing::info!(%device, "the restarted device is serving the guest again"),
                Some(e) => {
                    tracing::error!(%device, "vmm-core could not reconnect the restarted device: {e}");
                }
            },
            Event::Core(Ok(CoreToLauncher::Exited(reason))) => {
                tracing::info!(?reason, "the VM ended");
                if supervisor.wait_core(EXIT_TIMEOUT).is_none() {
                    tracing::warn!("vmm-core did not exit after the VM ended; killing it");
                    supervisor.kill_core();
                }
                return Outcome::from_reason(&reason);
            }
            Event::Core(Err(e)) => {
                tracing::debug!("control channel: {e}");
                let status = supervisor.wait_core(EXIT_TIMEOUT).or_else(|| {
                    // The channel broke but the process lives on: it cannot be trusted.
                    supervisor.kill_core()
                });
                let status = status.map_or_else(|| "unknown status".to_owned(), |s| s.to_string());
                return if stop_requested.is_some() {
                    Outcome::stopped(format!(
                        "the VM was stopped (vmm-core exited without confirming: {status})"
                    ))
                } else if matches!(e, ChannelError::Transport(ipc::fdpass::FdPassError::Closed)) {
                    Outcome::internal(format!("vmm-core died: {status}"))
                } else {
                    Outcome::internal(format!("vmm-core died: {status} (control channel: {e})"))
                };
            }
            Event::Signal(SIGCHLD) => {
                // Device deaths are logged by the supervisor. The core's end is reported
                // through the control channel (its last message may still be in flight).
                for exited in supervisor.reap() {
                    let Exited::Device { id, decision, .. } = exited else {
                        continue;
                    };
                    let msg = match decision {
                        Decision::RestartAt(_) => LauncherToCore::DeviceDown { device: id },
                        Decision::GiveUp => LauncherToCore::DeviceFailed { device: id },
                    };
                    if let Err(e) = control.send(&msg, &[]) {
                        tracing::warn!("cannot tell vmm-core about the device: {e}");
                    }
                }
                restart_devices(supervisor, control);
            }
            Event::Signal(_) | Event::ConsoleQuit => {
                if let Some(first) = stop_requested {
                    if first.elapsed() < REPEAT_GRACE {
                        continue;
                    }
                    let status = supervisor.kill_core();
                    return Outcome::stopped(format!(
                        "stopped again; vmm-core was killed{}",
                        status.map(|s| format!(" ({s})")).unwrap_or_default()
                    ));
                }
                tracing::info!("stopping the VM");
                stop_requested = Some(Instant::now());
                if let Err(e) = control.send(&LauncherToCore::Shutdown, &[]) {
                    tracing::debug!("cannot send Shutdown: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_is_sized_and_sealed() {
        let mfd = create_guest_ram(64 << 20).unwrap();
        assert_eq!(mfd.as_file().metadata().unwrap().len(), 64 << 20);
        let seals = mfd.seals().unwrap();
        for seal in [FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal] {
            assert!(seals.contains(&seal), "{seals:?}");
        }
        assert!(mfd.as_file().set_len(32 << 20).is_err());
        assert!(mfd.as_file().set_len(128 << 20).is_err());
        let flags = nix::fcntl::fcntl(mfd.as_file(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert!(
            nix::fcntl::FdFlag::from_bits_truncate(flags).contains(nix::fcntl::FdFlag::FD_CLOEXEC)
        );
    }

    #[test]
    fn outcomes_follow_exit_reasons() {
        assert_eq!(
            Outcome::from_reason(&ExitReason::PowerOff),
            Outcome {
                code: 0,
                summary: None
            }
        );
        let crash = Outcome::from_reason(&ExitReason::GuestCrash("triple fault".into()));
        assert_eq!(crash.code, exit_code::GUEST_CRASH);
        assert_eq!(
            crash.summary.as_deref(),
            Some("the guest crashed: triple fault")
        );
        assert_eq!(
            Outcome::from_reason(&ExitReason::Reboot).code,
            exit_code::REBOOT
        );
    }
}
