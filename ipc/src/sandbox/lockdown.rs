//! The process's own half of its confinement, run once by each binary after it has taken its
//! inherited descriptors and done what needs the filesystem, and before it touches guest
//! data or starts any thread.
//!
//! Landlock, capabilities and `no_new_privs` are per thread (only seccomp is installed on all
//! threads at once, with TSYNC), so [`lockdown`] refuses to run in a process that already has
//! more than one thread.
//!
//! Steps, by [`Mode`] (see [`super`] for the modes):
//! 1. `full`/`seccomp-log` only: check that the process is not in the host's user namespace
//!    (never touch the host's mounts), make every mount private, mount an empty tmpfs (mode
//!    0555) on an existing directory, `pivot_root` into it with the `pivot_root(".", ".")`
//!    trick, detach the old root, remount the new one read-only and check it is empty;
//! 2. `no_new_privs`;
//! 3. Landlock: every filesystem right (and TCP bind/connect, abstract-socket and signal
//!    scopes) handled with no rule granting anything, best effort on older kernels;
//! 4. capabilities: securebits locked (`NOROOT`, `NO_SETUID_FIXUP`, `KEEP_CAPS` off,
//!    `NO_CAP_AMBIENT_RAISE`), bounding set emptied, ambient set cleared, effective,
//!    permitted and inheritable sets zeroed (bounding set and securebits need `CAP_SETPCAP`,
//!    which a process started by hand by a non-root user does not have);
//! 5. open descriptors checked against the policy's list (an unexpected one is an error when
//!    the launcher confined the process, a warning otherwise);
//! 6. the policy's seccomp filters on every thread (TSYNC): kill-process on violation, or log
//!    in the debug modes (in kill mode `RUST_BACKTRACE` is dropped first: resolving a
//!    backtrace needs `getcwd` and file opens, which would turn a panic into `SIGSYS`);
//! 7. the report written to the launcher's report pipe, which is then closed.

use super::Mode;
use super::policy::{Policy, PolicyError, Violation};
use super::report::{LandlockReport, ProcessReport, RootView, SeccompReport};
use crate::inherit::{InheritError, take_inherited_fd};
use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// The Landlock ABI whose rights lockdown handles (the newest one tested; a newer kernel
/// still enforces these, an older one the subset it knows).
const LANDLOCK_ABI: ABI = ABI::V7;
/// [`LANDLOCK_ABI`] as a number, for the report.
const LANDLOCK_ABI_VERSION: u32 = 7;

/// Directories one of which exists in any Linux root: the empty tmpfs is mounted on the
/// first that does (it is detached again by the `pivot_root`).
const MOUNT_POINTS: [&str; 5] = ["/tmp", "/mnt", "/run", "/dev", "/proc"];

/// The highest descriptor number the open-descriptor check looks at (if `RLIMIT_NOFILE` is
/// higher).
const MAX_FD_SCAN: RawFd = 65_535;

/// Errors of locking a process down.
#[derive(Debug, thiserror::Error)]
pub enum LockdownError {
    #[error(transparent)]
    Mode(#[from] super::UnknownMode),
    #[error("{}={value:?} is not a descriptor number", super::REPORT_FD_ENV)]
    ReportFdValue { value: String },
    #[error("cannot take the report descriptor")]
    ReportFd(#[source] InheritError),
    #[error("cannot read {path}")]
    Proc {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "lockdown must run before the process starts threads (Landlock and capabilities are \
         per thread): it has {0}"
    )]
    Threads(u32),
    #[error(
        "{}={} says the launcher confined this process, but it runs in the host's user \
         namespace: refusing to touch the host's mounts",
        super::CONFINE_ENV, .0.env_value().unwrap_or("")
    )]
    HostUserNamespace(Mode),
    #[error("{step} failed")]
    Mount {
        step: &'static str,
        #[source]
        source: Errno,
    },
    #[error("none of {MOUNT_POINTS:?} exists to mount the empty root on")]
    NoMountPoint,
    #[error("the new root is not empty: {0:?}")]
    RootNotEmpty(Vec<String>),
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] Errno),
    #[error("Landlock restriction failed")]
    Landlock(#[source] landlock::RulesetError),
    #[error("cannot open {} for the Landlock remove rule", .path.display())]
    LandlockPath {
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
    #[error("{step} failed while dropping capabilities")]
    Caps {
        step: &'static str,
        #[source]
        source: Errno,
    },
    #[error("capabilities remain after dropping them: {0}")]
    CapsRemain(String),
    #[error("cannot scan the open descriptors")]
    FdScan(#[source] Errno),
    #[error(
        "descriptors {0:?} are open but not listed by the policy: refusing to run with \
         them (they would stay reachable through the sandbox)"
    )]
    UnexpectedFds(Vec<RawFd>),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("cannot install the seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
    #[error("cannot write the confinement report")]
    Report(#[source] std::io::Error),
}

/// Locks this process down according to its [`Mode`] and `policy`, reports to the launcher
/// and returns what it applied. In a binary built with the `confinement-selftest` feature
/// and run with `ATOLL_SELFTEST` set, it then attempts one escape and exits.
pub fn lockdown(policy: &Policy) -> Result<ProcessReport, LockdownError> {
    let mode = Mode::from_env()?;
    // Read before seccomp (getppid is on no allow-list): the ptrace self-test's target.
    #[cfg(feature = "confinement-selftest")]
    let parent = nix::unistd::getppid().as_raw();
    let report_fd = take_report_fd()?;
    let report = if mode == Mode::Unconfined {
        ProcessReport::unconfined(policy.name())
    } else {
        confine(mode, policy, report_fd.as_ref().map(AsRawFd::as_raw_fd))?
    };
    if let Some(fd) = report_fd {
        send_report(fd, &report)?;
    }
    #[cfg(feature = "confinement-selftest")]
    super::selftest::run_if_requested(parent);
    Ok(report)
}

fn confine(
    mode: Mode,
    policy: &Policy,
    report_fd: Option<RawFd>,
) -> Result<ProcessReport, LockdownError> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(LockdownError::Threads(threads));
    }
    let mut warnings = Vec::new();
    // Opened before the pivot_root, while the paths still resolve (afterwards they are
    // unreachable, so a rule only matters for a process without namespaces).
    let remove_beneath = policy
        .remove_beneath()
        .iter()
        .map(|dir| {
            PathFd::new(dir).map_err(|source| LockdownError::LandlockPath {
                path: dir.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let root = if mode.has_namespaces() {
        if in_host_user_namespace()? {
            return Err(LockdownError::HostUserNamespace(mode));
        }
        enter_empty_root()?;
        RootView::EmptyReadOnly
    } else {
        RootView::Host
    };
    nix::sys::prctl::set_no_new_privs().map_err(LockdownError::NoNewPrivs)?;
    let landlock = restrict_landlock(remove_beneath)?;
    let (bounding_caps_left, caps_warning) = drop_capabilities()?;
    warnings.extend(caps_warning);
    let open_fds = open_fds()?;
    let unexpected: Vec<RawFd> = open_fds
        .iter()
        .copied()
        .filter(|fd| *fd > 2 && !policy.expected_fds().contains(fd) && Some(*fd) != report_fd)
        .collect();
    if !unexpected.is_empty() {
        if mode.has_namespaces() {
            return Err(LockdownError::UnexpectedFds(unexpected));
        }
        let w = format!("descriptors {unexpected:?} are open but not listed by the policy");
        tracing::warn!("{w}");
        warnings.push(w);
    }
    tracing::debug!(fds = ?open_fds, "open descriptors at lockdown");

    let syscalls = u32::try_from(policy.syscall_count()).unwrap_or(u32::MAX);
    let (action, seccomp) = if mode.seccomp_logs() {
        (Violation::Log, SeccompReport::Log { syscalls })
    } else {
        (Violation::Kill, SeccompReport::Kill { syscalls })
    };
    if !mode.seccomp_logs() {
        warnings.extend(disable_backtraces());
    }
    let no_new_privs = nix::sys::prctl::get_no_new_privs().unwrap_or(false);
    let fallback = policy.compile_clone3_fallback()?;
    let allow_list = policy.compile(action)?;
    // The fallback first: once the allow-list is on, seccomp() itself is not allowed.
    seccompiler::apply_filter_all_threads(&fallback).map_err(LockdownError::Seccomp)?;
    seccompiler::apply_filter_all_threads(&allow_list).map_err(LockdownError::Seccomp)?;

    Ok(ProcessReport {
        name: policy.name().to_owned(),
        mode,
        root,
        landlock,
        caps_dropped: true,
        bounding_caps_left,
        no_new_privs,
        seccomp,
        open_fds,
        warnings,
    })
}

/// Turns off Rust's panic backtraces: resolving one calls `getcwd` and opens the binary's
/// files, which no allow-list lists, so a panic (which should end one thread, or the process
/// with its message) would become a `SIGSYS` kill with the message cut short. Debug modes
/// (seccomp in log mode) keep them.
fn disable_backtraces() -> Option<String> {
    let set: Vec<&str> = ["RUST_BACKTRACE", "RUST_LIB_BACKTRACE"]
        .into_iter()
        .filter(|v| std::env::var_os(v).is_some_and(|x| x != "0"))
        .collect();
    for v in &set {
        // SAFETY: the process has a single thread (checked at the start of lockdown), so
        // nothing reads the environment concurrently.
        unsafe { std::env::remove_var(v) };
    }
    (!set.is_empty()).then(|| {
        format!(
            "{} ignored: resolving a backtrace needs files the seccomp filter forbids \
             (use --debug-device NAME=seccomp-log for backtraces)",
            set.join(" and ")
        )
    })
}

/// Takes the report descriptor named by the environment, if any.
fn take_report_fd() -> Result<Option<OwnedFd>, LockdownError> {
    let Some(value) = std::env::var_os(super::REPORT_FD_ENV) else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    let fd: RawFd = text.parse().map_err(|_| LockdownError::ReportFdValue {
        value: text.clone().into_owned(),
    })?;
    take_inherited_fd(fd)
        .map(Some)
        .map_err(LockdownError::ReportFd)
}

fn send_report(fd: OwnedFd, report: &ProcessReport) -> Result<(), LockdownError> {
    let bytes = postcard::to_allocvec(report)
        .map_err(|e| LockdownError::Report(std::io::Error::other(e)))?;
    File::from(fd)
        .write_all(&bytes)
        .map_err(LockdownError::Report)
}

fn read_proc(path: &'static str) -> Result<String, LockdownError> {
    std::fs::read_to_string(path).map_err(|source| LockdownError::Proc { path, source })
}

fn thread_count() -> Result<u32, LockdownError> {
    let status = read_proc("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| LockdownError::Proc {
            path: "/proc/self/status",
            source: std::io::Error::other("no Threads: line"),
        })
}

/// The host's (initial) user namespace maps the whole uid range onto itself.
fn in_host_user_namespace() -> Result<bool, LockdownError> {
    let map = read_proc("/proc/self/uid_map")?;
    Ok(map.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f == ["0", "0", "4294967295"]
    }))
}

fn mount_err(step: &'static str) -> impl FnOnce(Errno) -> LockdownError {
    move |source| LockdownError::Mount { step, source }
}

/// Pivots into an empty read-only tmpfs and detaches the old root.
fn enter_empty_root() -> Result<(), LockdownError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(mount_err("making every mount private"))?;
    let dir = MOUNT_POINTS
        .iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .ok_or(LockdownError::NoMountPoint)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("atoll-root"),
        dir,
        Some("tmpfs"),
        flags,
        Some("size=4k,nr_inodes=2,mode=0555"),
    )
    .map_err(mount_err("mounting the empty tmpfs"))?;
    nix::unistd::chdir(dir).map_err(mount_err("chdir into the empty tmpfs"))?;
    // pivot_root(".", "."): the old root ends up stacked on top of the new one at "/", from
    // where a lazy unmount detaches it (and with it every host mount).
    nix::unistd::pivot_root(".", ".").map_err(mount_err("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(mount_err("detaching the old root"))?;
    nix::unistd::chdir("/").map_err(mount_err("chdir /"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | flags,
        None::<&str>,
    )
    .map_err(mount_err("remounting the root read-only"))?;
    let entries: Vec<String> = std::fs::read_dir("/")
        .map_err(|e| LockdownError::Mount {
            step: "listing the new root",
            source: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !entries.is_empty() {
        return Err(LockdownError::RootNotEmpty(entries));
    }
    Ok(())
}

fn restrict_landlock(remove_beneath: Vec<PathFd>) -> Result<LandlockReport, LockdownError> {
    let err = LockdownError::Landlock;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .map_err(err)?
        .handle_access(AccessNet::from_all(LANDLOCK_ABI))
        .map_err(err)?
        .scope(Scope::from_all(LANDLOCK_ABI))
        .map_err(err)?
        .create()
        .map_err(err)?;
    for fd in remove_beneath {
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, AccessFs::RemoveFile))
            .map_err(err)?;
    }
    let status = ruleset.restrict_self().map_err(err)?;
    Ok(match (status.landlock, status.ruleset) {
        (LandlockStatus::NotEnabled, _) => {
            LandlockReport::Unavailable("not enabled at boot (lsm=)".into())
        }
        (LandlockStatus::NotImplemented, _) => {
            LandlockReport::Unavailable("the kernel is built without it".into())
        }
        (_, RulesetStatus::NotEnforced) => {
            LandlockReport::Unavailable("the ruleset was not enforced".into())
        }
        (_, enforced) => LandlockReport::Enforced {
            // What was achieved: the kernel's ABI, capped at the one whose rights we handle.
            abi: super::probe::landlock_abi()
                .unwrap_or(0)
                .min(LANDLOCK_ABI_VERSION),
            full: enforced == RulesetStatus::FullyEnforced,
        },
    })
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_SETPCAP: u32 = 8;

fn capget() -> Result<[CapData; 2], Errno> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a v3 header reads it and writes two CapData structs.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if ret != 0 {
        return Err(Errno::last());
    }
    Ok(data)
}

fn prctl(step: &'static str, op: libc::c_int, arg: libc::c_ulong) -> Result<(), LockdownError> {
    // SAFETY: prctl with integer arguments only.
    let ret = unsafe {
        libc::prctl(
            op,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if ret < 0 {
        return Err(LockdownError::Caps {
            step,
            source: Errno::last(),
        });
    }
    Ok(())
}

/// Drops every capability; returns how many stay in the bounding set (and a warning then).
fn drop_capabilities() -> Result<(u32, Option<String>), LockdownError> {
    let caps_err = |step| move |source| LockdownError::Caps { step, source };
    let before = capget().map_err(caps_err("capget"))?;
    let setpcap = before[0].effective & (1 << CAP_SETPCAP) != 0;
    // Capabilities 0..last: PR_CAPBSET_READ fails with EINVAL past the last one.
    let mut caps = Vec::new();
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_READ only reads.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        if r < 0 {
            break;
        }
        caps.push((cap, r == 1));
    }
    if setpcap {
        let bits = libc::SECBIT_NOROOT
            | libc::SECBIT_NOROOT_LOCKED
            | libc::SECBIT_NO_SETUID_FIXUP
            | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
            | libc::SECBIT_KEEP_CAPS_LOCKED
            | libc::SECBIT_NO_CAP_AMBIENT_RAISE
            | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
        prctl(
            "PR_SET_SECUREBITS",
            libc::PR_SET_SECUREBITS,
            libc::c_ulong::try_from(bits).unwrap_or(0),
        )?;
        for &(cap, set) in &caps {
            if set {
                prctl("PR_CAPBSET_DROP", libc::PR_CAPBSET_DROP, cap)?;
            }
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointer.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r < 0 {
        return Err(LockdownError::Caps {
            step: "PR_CAP_AMBIENT_CLEAR_ALL",
            source: Errno::last(),
        });
    }
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let zero = [CapData::default(); 2];
    // SAFETY: capset with a v3 header reads it and two CapData structs.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, zero.as_ptr()) };
    if ret != 0 {
        return Err(LockdownError::Caps {
            step: "capset",
            source: Errno::last(),
        });
    }
    let after = capget().map_err(caps_err("capget"))?;
    if after
        .iter()
        .any(|d| d.effective | d.permitted | d.inheritable != 0)
    {
        return Err(LockdownError::CapsRemain(format!(
            "effective {:#x}{:08x} permitted {:#x}{:08x}",
            after[1].effective, after[0].effective, after[1].permitted, after[0].permitted
        )));
    }
    let mut left = 0u32;
    for &(cap, _) in &caps {
        // SAFETY: PR_CAPBSET_READ only reads.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) } == 1 {
            left += 1;
        }
    }
    let warning = (left > 0).then(|| {
        format!(
            "{left} capabilities stay in the bounding set (no CAP_SETPCAP to drop them); \
             no_new_privs keeps exec from granting them"
        )
    });
    Ok((left, warning))
}

/// The open descriptors, found with `poll` (an unused number reports `POLLNVAL`), which
/// needs no `/proc` (gone after the `pivot_root`).
fn open_fds() -> Result<Vec<RawFd>, LockdownError> {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(LockdownError::FdScan)?;
    let limit = RawFd::try_from(soft)
        .unwrap_or(MAX_FD_SCAN)
        .min(MAX_FD_SCAN);
    let mut open = Vec::new();
    let mut first = 0;
    const CHUNK: RawFd = 1024;
    while first < limit {
        let n = CHUNK.min(limit - first);
        let mut pfds: Vec<libc::pollfd> = (first..first + n)
            .map(|fd| libc::pollfd {
                fd,
                events: 0,
                revents: 0,
            })
            .collect();
        let nfds =
            libc::nfds_t::try_from(pfds.len()).map_err(|_| LockdownError::FdScan(Errno::EINVAL))?;
        loop {
            // SAFETY: `pfds` is a valid array of `nfds` pollfds; poll only writes `revents`.
            let ret = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, 0) };
            if ret >= 0 {
                break;
            }
            match Errno::last() {
                Errno::EINTR => {}
                e => return Err(LockdownError::FdScan(e)),
            }
        }
        open.extend(
            pfds.iter()
                .filter(|p| p.revents & libc::POLLNVAL == 0)
                .map(|p| p.fd),
        );
        first += n;
    }
    Ok(open)
}
