//! Starting and watching atoll's child processes.
//!
//! The [`Supervisor`] owns every child: `vmm-core` and one `dev-blk` per image disk (an
//! external backend given with `--disk socket=` is not atoll's child). Each child is a
//! fresh `exec` of its binary with an explicit list of inherited descriptors
//! ([`ipc::spawn::spawn_with_fds`]), in its own process group so that the terminal's Ctrl-C
//! reaches only the launcher, which then stops the VM in order.
//!
//! A device process keeps everything it needs to be started again (binary, arguments, the
//! listening socket the launcher owns, the image descriptor): restarting a crashed device is
//! [`DeviceProcess::spawn`] once more. Today a device's death is logged with its pid and status.

#![forbid(unsafe_code)]

use crate::config::ImageDisk;
use crate::confine::{Confiner, Kind};
use crate::net::Nic;
use crate::restart::{Decision, RestartPolicy};
use ipc::control::CORE_CONTROL_FD;
use ipc::sandbox::spawn::SpawnError;
use ipc::sandbox::{ConfinedChild, ConfinedCommand};
use ipc::spawn::Inherit;
use std::ffi::OsString;
use std::fs::DirBuilder;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

/// Descriptor numbers a device process finds its listening socket and its resources at:
/// the socket at 3, then its resources (dev-blk: the image; dev-net: one tap per queue pair)
/// from 4 on.
pub const DEVICE_SOCKET_FD: i32 = 3;
pub const DEVICE_FIRST_RESOURCE_FD: i32 = 4;

/// How long a new child may take to lock itself down and report its confinement.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The size of an image file or block device (0 if it cannot be told).
fn image_size(image: &std::fs::File) -> u64 {
    use std::io::Seek;
    let mut f = image;
    f.seek(std::io::SeekFrom::End(0)).unwrap_or(0)
}

/// The longest path a UNIX socket address holds (`sun_path` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Errors of starting and supervising children.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot find the directory of the atoll binary")]
    CurrentExe(#[source] io::Error),
    #[error("cannot start {what} ({}; set {env} to its path)", program.display())]
    Spawn {
        what: &'static str,
        program: PathBuf,
        env: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the runtime directory {}", .path.display())]
    RuntimeDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("socket path {} is longer than {MAX_SOCKET_PATH} bytes (set XDG_RUNTIME_DIR to a shorter directory)", .0.display())]
    SocketPathTooLong(PathBuf),
    #[error("cannot listen on {}", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Confine(crate::confine::ConfineError),
    #[error("cannot connect to {}", .path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A helper binary atoll starts, found next to the `atoll` binary unless its environment
/// variable names another path.
#[derive(Clone, Copy, Debug)]
pub struct HelperBinary {
    /// Short name used in messages and the file name next to `atoll`.
    pub name: &'static str,
    /// The environment variable that overrides its path.
    pub env: &'static str,
}

/// The VMM core.
pub const VMM_CORE: HelperBinary = HelperBinary {
    name: "vmm-core",
    env: "ATOLL_CORE_BIN",
};
/// The block-device backend.
pub const DEV_BLK: HelperBinary = HelperBinary {
    name: "dev-blk",
    env: "ATOLL_DEV_BLK_BIN",
};
/// The network-card backend.
pub const DEV_NET: HelperBinary = HelperBinary {
    name: "dev-net",
    env: "ATOLL_DEV_NET_BIN",
};

impl HelperBinary {
    /// The path to execute.
    pub fn locate(self) -> Result<PathBuf, SupervisorError> {
        if let Some(path) = std::env::var_os(self.env).filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(path));
        }
        let exe = std::env::current_exe().map_err(SupervisorError::CurrentExe)?;
        let dir = exe.parent().ok_or_else(|| {
            SupervisorError::CurrentExe(io::Error::other("the binary has no parent directory"))
        })?;
        Ok(dir.join(self.name))
    }

    fn spawn_error(self, program: &Path, source: io::Error) -> SupervisorError {
        SupervisorError::Spawn {
            what: self.name,
            program: program.to_owned(),
            env: self.env,
            source,
        }
    }
}

/// A private directory for the device sockets (mode 0700), removed on drop.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Creates `atoll-<pid>-<n>` under `$XDG_RUNTIME_DIR`, or `/tmp` when that is unset.
    pub fn create() -> Result<Self, SupervisorError> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|p| !p.is_empty())
            .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        Self::create_in(&base)
    }

    /// Creates a fresh private directory under `base`.
    pub fn create_in(base: &Path) -> Result<Self, SupervisorError> {
        let pid = std::process::id();
        for n in 0u32.. {
            let path = base.join(format!("atoll-{pid}-{n}"));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    // The umask could only have removed bits; make the mode exact anyway.
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                        .map_err(|source| SupervisorError::RuntimeDir {
                            path: path.clone(),
                            source,
                        })?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(SupervisorError::RuntimeDir { path, source }),
            }
        }
        unreachable!("u32 range exhausted while naming the runtime directory")
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A running or exited child.
#[derive(Debug)]
struct ChildProcess {
    child: ConfinedChild,
    status: Option<ExitStatus>,
}

impl ChildProcess {
    fn new(child: ConfinedChild) -> Self {
        Self {
            child,
            status: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Collects the exit status if the child has exited; returns it only the first time.
    fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return None;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.status = Some(status);
                Some(status)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("cannot wait for pid {}: {e}", self.pid());
                None
            }
        }
    }

    /// Waits up to `timeout` for the child to exit.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll_exit();
            if self.status.is_some() || Instant::now() >= deadline {
                return self.status;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the child (if it still runs) and collects its status.
    fn kill(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.kill() {
                Ok(status) => self.status = Some(status),
                Err(e) => tracing::warn!("cannot kill pid {}: {e}", self.pid()),
            }
        }
        self.status
    }
}

/// Starts `cmd` with `fds`, and prints (first start) or logs (restarts) the confinement it
/// got, once the process has locked itself down.
fn start_confined(
    cmd: &ConfinedCommand,
    fds: &[Inherit<'_>],
    kind: HelperBinary,
    program: &Path,
    first: bool,
) -> Result<ChildProcess, SupervisorError> {
    let mut child = cmd.spawn(fds).map_err(|e| {
        let source = match e {
            SpawnError::Child { source, .. } => source,
            other => io::Error::other(other.to_string()),
        };
        kind.spawn_error(program, source)
    })?;
    let report = child.read_report(REPORT_TIMEOUT);
    if first {
        eprintln!("atoll: confinement: {report}");
    } else {
        tracing::info!("{report}");
    }
    Ok(ChildProcess::new(child))
}

/// A device process and what it takes to start it (again).
#[derive(Debug)]
pub struct DeviceProcess {
    /// `disk0`, `net0`, ...
    id: String,
    kind: HelperBinary,
    program: PathBuf,
    /// How it is started, confined (the same for every incarnation).
    command: ConfinedCommand,
    /// The listening vhost-user socket; the launcher owns it for the VM's lifetime so that a
    /// new incarnation accepts on the same socket.
    listener: UnixListener,
    socket_path: PathBuf,
    /// What the device serves, inherited from [`DEVICE_FIRST_RESOURCE_FD`] on: dev-blk's
    /// image (opened with the disk's mode), dev-net's tap queues.
    resources: Vec<OwnedFd>,
    process: Option<ChildProcess>,
    policy: RestartPolicy,
    /// When the dead process is due to be started again.
    restart_at: Option<Instant>,
}

impl DeviceProcess {
    /// Starts (or starts again) the device process with its socket at
    /// [`DEVICE_SOCKET_FD`] and its resources after it.
    pub fn spawn(&mut self) -> Result<(), SupervisorError> {
        let mut fds = vec![Inherit {
            fd: self.listener.as_fd(),
            target: DEVICE_SOCKET_FD,
        }];
        fds.extend(
            (DEVICE_FIRST_RESOURCE_FD..)
                .zip(&self.resources)
                .map(|(target, fd)| Inherit {
                    fd: fd.as_fd(),
                    target,
                }),
        );
        let first = self.process.is_none();
        let process = start_confined(&self.command, &fds, self.kind, &self.program, first)?;
        tracing::info!(device = %self.id, pid = process.pid(), "started {}", self.kind.name);
        self.process = Some(process);
        Ok(())
    }

    /// Connects a new stream to the device's listening socket (for the core).
    pub fn connect(&self) -> Result<UnixStream, SupervisorError> {
        UnixStream::connect(&self.socket_path).map_err(|source| SupervisorError::Connect {
            path: self.socket_path.clone(),
            source,
        })
    }
}

/// The arguments `dev-blk` gets for `disk`.
pub fn dev_blk_args(disk: &ImageDisk) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--socket-fd".into(),
        DEVICE_SOCKET_FD.to_string().into(),
        "--image-fd".into(),
        DEVICE_FIRST_RESOURCE_FD.to_string().into(),
    ];
    if disk.spec.readonly {
        args.push("--readonly".into());
    }
    if disk.spec.queues != 1 {
        args.push("--queues".into());
        args.push(disk.spec.queues.to_string().into());
    }
    if let Some(serial) = &disk.spec.serial {
        args.push("--serial".into());
        args.push(serial.into());
    }
    args
}

/// The arguments `dev-net` gets for `nic` (its taps at 4, 5, ...).
pub fn dev_net_args(nic: &Nic) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--socket-fd".into(), DEVICE_SOCKET_FD.to_string().into()];
    for (fd, _) in (DEVICE_FIRST_RESOURCE_FD..).zip(&nic.taps) {
        args.push("--tap-fd".into());
        args.push(fd.to_string().into());
    }
    args.push("--mac".into());
    args.push(nic.mac.to_string().into());
    if let Some(mtu) = nic.mtu {
        args.push("--mtu".into());
        args.push(mtu.to_string().into());
    }
    args
}

/// A child that exited, as reported by [`Supervisor::reap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exited {
    /// `vmm-core` exited.
    Core(ExitStatus),
    /// A device process exited.
    Device {
        id: String,
        pid: u32,
        status: ExitStatus,
        /// What the restart policy says about it.
        decision: Decision,
    },
}

/// Owns atoll's children and the resources they are started with.
pub struct Supervisor {
    confiner: Confiner,
    core: Option<ChildProcess>,
    devices: Vec<DeviceProcess>,
    // Dropped after the devices (field order), so the sockets close before their directory
    // goes away.
    runtime_dir: Option<RuntimeDir>,
}

impl Supervisor {
    /// A supervisor with no children; `confiner` says how to start them.
    pub fn new(confiner: Confiner) -> Self {
        Self {
            confiner,
            core: None,
            devices: Vec::new(),
            runtime_dir: None,
        }
    }

    /// Starts the backend of `disk` on a new listening socket and returns a stream connected
    /// to it, for the core.
    pub fn start_disk(
        &mut self,
        disk: ImageDisk,
        program: &Path,
    ) -> Result<UnixStream, SupervisorError> {
        let args = dev_blk_args(&disk);
        let image_bytes = image_size(&disk.image);
        let kind = Kind::Blk {
            image_bytes,
            queues: disk.spec.queues,
        };
        self.start_device(
            disk.id,
            DEV_BLK,
            program,
            args,
            kind,
            vec![disk.image.into()],
        )
    }

    /// Starts the backend of `nic` on a new listening socket and returns a stream connected to
    /// it, for the core.
    pub fn start_nic(&mut self, nic: Nic, program: &Path) -> Result<UnixStream, SupervisorError> {
        let args = dev_net_args(&nic);
        tracing::info!(device = %nic.id, tap = %nic.ifname, mac = %nic.mac,
            queue_pairs = nic.taps.len(), "starting dev-net");
        let kind = Kind::Net {
            pairs: nic.queue_pairs(),
        };
        self.start_device(nic.id, DEV_NET, program, args, kind, nic.taps)
    }

    fn start_device(
        &mut self,
        id: String,
        kind: HelperBinary,
        program: &Path,
        args: Vec<OsString>,
        limits: Kind,
        resources: Vec<OwnedFd>,
    ) -> Result<UnixStream, SupervisorError> {
        let command = self
            .confiner
            .command(&id, program, &args, limits)
            .map_err(SupervisorError::Confine)?;
        let dir = match &mut self.runtime_dir {
            Some(dir) => dir,
            none => none.insert(RuntimeDir::create()?),
        };
        let socket_path = dir.path().join(format!("{id}.sock"));
        if socket_path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SupervisorError::SocketPathTooLong(socket_path));
        }
        let listener =
            UnixListener::bind(&socket_path).map_err(|source| SupervisorError::Bind {
                path: socket_path.clone(),
                source,
            })?;
        let mut device = DeviceProcess {
            command,
            id,
            kind,
            program: program.to_owned(),
            listener,
            socket_path,
            resources,
            process: None,
            policy: RestartPolicy::new(Instant::now()),
            restart_at: None,
        };
        device.spawn()?;
        // The connection waits in the listener's backlog until the device accepts it.
        let stream = device.connect();
        self.devices.push(device);
        stream
    }

    /// Starts `vmm-core` with `control` as its only inherited descriptor besides stdio.
    pub fn start_core(
        &mut self,
        program: &Path,
        control: OwnedFd,
        limits: Kind,
    ) -> Result<u32, SupervisorError> {
        let cmd = self
            .confiner
            .command(VMM_CORE.name, program, &[], limits)
            .map_err(SupervisorError::Confine)?;
        let process = start_confined(
            &cmd,
            &[Inherit {
                fd: control.as_fd(),
                target: CORE_CONTROL_FD,
            }],
            VMM_CORE,
            program,
            true,
        )?;
        let pid = process.pid();
        tracing::info!(pid, "started vmm-core");
        self.core = Some(process);
        Ok(pid)
    }

    /// Collects every child that has exited since the last call, without blocking, and logs
    /// each device that died.
    pub fn reap(&mut self) -> Vec<Exited> {
        let mut exited = Vec::new();
        if let Some(status) = self.core.as_mut().and_then(ChildProcess::poll_exit) {
            tracing::debug!(%status, "vmm-core exited");
            exited.push(Exited::Core(status));
        }
        for device in &mut self.devices {
            let Some(process) = device.process.as_mut() else {
                continue;
            };
            if let Some(status) = process.poll_exit() {
                let pid = process.pid();
                let now = Instant::now();
                let decision = device.policy.died(now);
                match decision {
                    Decision::RestartAt(at) => {
                        tracing::error!(
                            "device {} ({} pid {pid}) died: {status}; restarting it in {:?} (restart {} of {} allowed per {:?})",
                            device.id,
                            device.kind.name,
                            at.saturating_duration_since(now),
                            device.policy.count(),
                            crate::restart::BUDGET,
                            crate::restart::BUDGET_WINDOW,
                        );
                        device.restart_at = Some(at);
                    }
                    Decision::GiveUp => tracing::error!(
                        "device {} ({} pid {pid}) died: {status}; it used up its restart budget ({} per {:?}) and is marked failed: the guest sees I/O errors on it",
                        device.id,
                        device.kind.name,
                        crate::restart::BUDGET,
                        crate::restart::BUDGET_WINDOW,
                    ),
                }
                exited.push(Exited::Device {
                    id: device.id.clone(),
                    pid,
                    status,
                    decision,
                });
            }
        }
        exited
    }

    /// The earliest moment a dead device is due to be started again.
    pub fn next_restart(&self) -> Option<Instant> {
        self.devices.iter().filter_map(|d| d.restart_at).min()
    }

    /// Starts every dead device whose backoff has passed; returns, per device, a new stream
    /// connected to its listening socket (for the core's `Reconnect`), or why it could not be
    /// started (the next death check retries it).
    pub fn restart_due(
        &mut self,
        now: Instant,
    ) -> Vec<(String, Result<UnixStream, SupervisorError>)> {
        let mut restarted = Vec::new();
        for device in &mut self.devices {
            if device.restart_at.is_none_or(|at| at > now) {
                continue;
            }
            device.restart_at = None;
            device.policy.restarted(now);
            let result = device.spawn().and_then(|()| device.connect());
            if let Err(e) = &result {
                tracing::error!(device = %device.id, "cannot restart: {e}");
            }
            restarted.push((device.id.clone(), result));
        }
        restarted
    }

    /// Waits up to `timeout` for `vmm-core` to exit; `None` if it still runs (or never ran).
    pub fn wait_core(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.core.as_mut()?.wait_timeout(timeout)
    }

    /// Kills `vmm-core` if it still runs and returns its exit status.
    pub fn kill_core(&mut self) -> Option<ExitStatus> {
        self.core.as_mut()?.kill()
    }

    /// Stops every child: the core first (it holds the devices' clients), then the devices.
    pub fn shutdown(&mut self) {
        if let Some(core) = &mut self.core
            && core.status.is_none()
        {
            tracing::debug!(pid = core.pid(), "killing vmm-core");
            core.kill();
        }
        for device in &mut self.devices {
            if let Some(process) = &mut device.process
                && process.status.is_none()
            {
                tracing::debug!(device = %device.id, pid = process.pid(), "killing");
                process.kill();
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskSpec, ImageSpec};
    use std::fs::File;

    fn image_spec(text: &str) -> ImageSpec {
        match DiskSpec::parse(text).unwrap() {
            DiskSpec::Image(spec) => spec,
            other => panic!("{text} parsed as {other:?}"),
        }
    }

    fn disk(spec: &str) -> ImageDisk {
        ImageDisk {
            id: "disk0".into(),
            spec: image_spec(spec),
            image: File::open("/dev/null").unwrap(),
        }
    }

    #[test]
    fn dev_blk_arguments() {
        assert_eq!(
            dev_blk_args(&disk("path=a")),
            ["--socket-fd", "3", "--image-fd", "4"]
        );
        assert_eq!(
            dev_blk_args(&disk("path=a,readonly=on,queues=2,serial=SN1")),
            [
                "--socket-fd",
                "3",
                "--image-fd",
                "4",
                "--readonly",
                "--queues",
                "2",
                "--serial",
                "SN1"
            ]
        );
    }

    #[test]
    fn runtime_dir_is_private_and_removed() {
        let dir = RuntimeDir::create_in(&std::env::temp_dir()).unwrap();
        let path = dir.path().to_owned();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let second = RuntimeDir::create_in(&std::env::temp_dir()).unwrap();
        assert_ne!(second.path(), path);
        std::fs::write(path.join("x.sock"), b"").unwrap();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn device_gets_its_socket_and_image_and_dies_logged() {
        // A stand-in dev-blk: a shell that reports its fds and arguments, then exits 7.
        let dir = RuntimeDir::create_in(&std::env::temp_dir()).unwrap();
        let report = dir.path().join("report");
        let script = dir.path().join("fake-dev-blk");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\neval \"exec $ATOLL_CONFINE_REPORT_FD>&-\"\necho \"$*\" > {r}.tmp\nreadlink /proc/self/fd/4 >> {r}.tmp\n\
                 [ -S /proc/self/fd/3 ] || ls -l /proc/self/fd/3 >> {r}.tmp\n\
                 mv {r}.tmp {r}\nexit 7\n",
                r = report.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let image_path = dir.path().join("disk.img");
        std::fs::write(&image_path, [0u8; 512]).unwrap();
        let d = ImageDisk {
            id: "disk0".into(),
            spec: image_spec(&format!("path={},readonly=on", image_path.display())),
            image: File::open(&image_path).unwrap(),
        };
        // The stand-in is a shell script writing into the test's directory: unconfined.
        let confiner = Confiner::new(
            false,
            &["disk0=unconfined".to_owned()],
            &["disk0".to_owned()],
            64 << 20,
        )
        .unwrap();
        let mut sup = Supervisor::new(confiner);
        let _stream = sup.start_disk(d, &script).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut exits = Vec::new();
        while exits.is_empty() && Instant::now() < deadline {
            exits = sup.reap();
            thread::sleep(Duration::from_millis(5));
        }
        let [Exited::Device { id, status, .. }] = &exits[..] else {
            panic!("{exits:?}");
        };
        assert_eq!(id, "disk0");
        assert_eq!(status.code(), Some(7));
        let text = std::fs::read_to_string(&report).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("--socket-fd 3 --image-fd 4 --readonly"));
        assert_eq!(lines.next(), Some(image_path.to_str().unwrap()));
        assert_eq!(lines.next(), None, "fd 3 is not a socket: {text}");
        assert!(sup.reap().is_empty(), "an exit is reported once");
    }
}
