//! Starting a confined child: `clone3` into new namespaces (and its cgroup leaf), a uid/gid
//! map written by the parent, `no_new_privs`, rlimits, exactly the listed descriptors, `exec`.
//!
//! This replaces [`crate::spawn::spawn_with_fds`] for atoll's children, with the same
//! descriptor rules (each listed descriptor at its target number, stdio inherited unless a
//! target overrides it, everything else closed at `exec`, `PR_SET_PDEATHSIG` = `SIGKILL`), and
//! returns a [`ConfinedChild`] holding a pidfd to wait for and signal the child.
//!
//! Written by hand because no crate does this: `std::process::Command` cannot create a user
//! namespace and write its maps between `clone` and `exec` (the parent must write them while
//! the child waits), nor return a pidfd on stable Rust, nor start a child in a cgroup.
//!
//! # The child between `clone3` and `exec`
//!
//! The launcher may have other threads, so the child runs only async-signal-safe code: raw
//! system calls on memory prepared before `clone3` (paths, argv, envp, the descriptor plan),
//! no allocation, no locks, no glibc wrappers that broadcast to threads (`setresuid` and
//! `setgroups` are issued as raw system calls for that reason). It:
//! 1. waits on a pipe until the parent has written `/proc/PID/setgroups`, `uid_map` and
//!    `gid_map` (end of file there means the parent gave up or died: the child exits);
//! 2. becomes uid/gid 0 of its namespace (host uid/gid = the mapped ones) and, when the
//!    launcher is root, drops its supplementary groups; only then sets `PR_SET_PDEATHSIG`
//!    (a euid change clears it) and checks that the parent still holds the pipe open;
//! 3. optionally starts its own process group, unblocks every signal, resets ignored ones;
//! 4. sets `no_new_privs`, places the descriptors, sets the rlimits, and `execve`s.
//!
//! A failing step writes `(step, errno)` to a close-on-exec pipe, which the parent turns into
//! [`SpawnError::Child`]; end of file on that pipe means the `exec` succeeded.
//!
//! # Uids
//!
//! When the launcher runs as root, each child's namespace uid/gid 0 maps to a dedicated host
//! uid/gid from [`IdAllocator`]: the block `HOST_ID_BASE + (launcher pid mod 65536) * 256`,
//! one id per child slot. Those ids own no files and belong to no one, so a process that
//! escaped its namespaces could not touch anything by ownership. An unprivileged launcher can
//! only map the namespace's 0 to its own uid/gid; the report says so.

use super::Mode;
use super::cgroup::CgroupLeaf;
use super::report::{
    CgroupReport, ConfinementReport, IdReport, LauncherReport, ProcessReport, ProcessSide, Rlimits,
};
use crate::spawn::Inherit;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// The first host uid/gid handed to confined children of a root launcher (`0x7000_0000`).
pub const HOST_ID_BASE: u32 = 0x7000_0000;
/// Ids per launcher: at most this many children (and restarts reuse their child's id).
pub const IDS_PER_LAUNCHER: u32 = 256;
/// Launcher blocks in the range: `HOST_ID_BASE .. HOST_ID_BASE + 256 * 65536`.
pub const LAUNCHER_ID_BLOCKS: u32 = 0x1_0000;

/// `CLONE_INTO_CGROUP` (libc's constant is an `int` that cannot hold it).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The most descriptors one child may inherit (the child places them from a fixed array).
pub const MAX_INHERITED: usize = 64;

/// The namespaces a fully confined child gets, with their `clone` flags.
const NAMESPACES: [(&str, u64); 7] = [
    ("user", libc::CLONE_NEWUSER as u64),
    ("pid", libc::CLONE_NEWPID as u64),
    ("mnt", libc::CLONE_NEWNS as u64),
    ("net", libc::CLONE_NEWNET as u64),
    ("ipc", libc::CLONE_NEWIPC as u64),
    ("uts", libc::CLONE_NEWUTS as u64),
    ("cgroup", libc::CLONE_NEWCGROUP as u64),
];

/// Errors of starting, waiting for or signalling a confined child.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{name}: descriptor target {target} is listed twice or is negative")]
    BadTarget { name: String, target: RawFd },
    #[error("{name}: {count} inherited descriptors exceed the limit of {MAX_INHERITED}")]
    TooManyFds { name: String, count: usize },
    #[error("{name}: {what} contains a NUL byte")]
    Nul { name: String, what: String },
    #[error("{name}: the wrapper command is empty")]
    EmptyWrapper { name: String },
    #[error("{name}: cannot find {program:?} in PATH")]
    NotInPath { name: String, program: OsString },
    #[error("{name}: cannot create a pipe")]
    Pipe {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("{name}: clone3 failed")]
    Clone {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("{name}: cannot write {}", .path.display())]
    IdMap {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{name}: the child failed at {step} before exec{}",
        if *.step == "execve" { format!(" of {}", .program.display()) } else { String::new() }
    )]
    Child {
        name: String,
        step: &'static str,
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{name}: the child's start-up report pipe returned {len} bytes")]
    ChildPipe { name: String, len: usize },
    #[error("{name} (pid {pid}): waitid on its pidfd failed")]
    Wait {
        name: String,
        pid: u32,
        #[source]
        source: Errno,
    },
    #[error("{name} (pid {pid}): cannot send {signal}")]
    Signal {
        name: String,
        pid: u32,
        signal: Signal,
        #[source]
        source: Errno,
    },
    #[error("the launcher's block of {IDS_PER_LAUNCHER} dedicated uids is used up")]
    IdsExhausted,
}

/// The host uid and gid a child's namespace root maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostIds {
    pub uid: u32,
    pub gid: u32,
}

/// Hands out dedicated host ids to a root launcher's children (see the module docs).
#[derive(Debug)]
pub struct IdAllocator {
    first: u32,
    next: u32,
}

impl IdAllocator {
    /// The allocator of the launcher with pid `launcher_pid`.
    pub fn for_launcher(launcher_pid: u32) -> Self {
        Self {
            first: HOST_ID_BASE + (launcher_pid % LAUNCHER_ID_BLOCKS) * IDS_PER_LAUNCHER,
            next: 0,
        }
    }

    /// The allocator of this process.
    pub fn for_this_launcher() -> Self {
        Self::for_launcher(std::process::id())
    }

    /// The next unused uid/gid pair (uid = gid).
    pub fn allocate(&mut self) -> Result<HostIds, SpawnError> {
        if self.next >= IDS_PER_LAUNCHER {
            return Err(SpawnError::IdsExhausted);
        }
        let id = self.first + self.next;
        self.next += 1;
        Ok(HostIds { uid: id, gid: id })
    }
}

/// How a child is started: fully confined, or one of the per-device debug modes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Confinement {
    /// Every launcher-side measure; the process's lockdown kills on a seccomp violation.
    Full,
    /// As `Full`, but seccomp violations are logged instead (`--debug-device NAME=seccomp-log`).
    SeccompLog,
    /// No launcher-side measure; the process's lockdown applies nothing
    /// (`--debug-device NAME=unconfined`).
    Unconfined,
    /// Started under a wrapper command (`--debug-device NAME=wrap:'strace -f -o FILE'`): no
    /// namespaces, no id change, no rlimits, so that the wrapper can use the host's files and
    /// network; the device's lockdown still applies Landlock, drops capabilities, sets
    /// `no_new_privs` and installs seccomp in log mode. The pidfd is the wrapper's; if the
    /// launcher dies, the wrapper gets `SIGKILL` and the device is left to it (a tracee is
    /// detached, a gdbserver inferior killed).
    Wrapped(Vec<OsString>),
}

impl Confinement {
    /// The [`Mode`] the child's lockdown runs in.
    pub fn mode(&self) -> Mode {
        match self {
            Self::Full => Mode::Full,
            Self::SeccompLog => Mode::SeccompLog,
            Self::Unconfined => Mode::Unconfined,
            Self::Wrapped(_) => Mode::Wrapped,
        }
    }

    fn namespaced(&self) -> bool {
        matches!(self, Self::Full | Self::SeccompLog)
    }
}

/// An invalid `--debug-device` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DebugSpecError {
    #[error("--debug-device {0:?}: expected NAME=MODE")]
    NoName(String),
    #[error("--debug-device {0:?}: unknown mode (expected seccomp-log, unconfined or wrap:'CMD')")]
    UnknownMode(String),
    #[error("--debug-device {0:?}: the wrapper command is empty")]
    EmptyWrapper(String),
    #[error("--debug-device {0:?}: unbalanced quote in the wrapper command")]
    Quote(String),
}

/// Parses `NAME=MODE` (`seccomp-log`, `unconfined`, or `wrap:CMD` where CMD is split into
/// words at blanks; single or double quotes group words, and one pair of quotes around the
/// whole CMD is allowed: `wrap:'strace -f -o /tmp/t'`).
pub fn parse_debug_device(arg: &str) -> Result<(String, Confinement), DebugSpecError> {
    let (name, mode) = arg
        .split_once('=')
        .filter(|(n, _)| !n.is_empty())
        .ok_or_else(|| DebugSpecError::NoName(arg.to_owned()))?;
    let confinement = match mode {
        "seccomp-log" => Confinement::SeccompLog,
        "unconfined" => Confinement::Unconfined,
        m => {
            let cmd = m
                .strip_prefix("wrap:")
                .ok_or_else(|| DebugSpecError::UnknownMode(arg.to_owned()))?;
            let words = split_words(cmd).ok_or_else(|| DebugSpecError::Quote(arg.to_owned()))?;
            // `wrap:'strace -f'` quoted as a whole arrives as one word: split it again.
            let words = match words.as_slice() {
                [one] if one.contains(char::is_whitespace) => {
                    split_words(one).ok_or_else(|| DebugSpecError::Quote(arg.to_owned()))?
                }
                _ => words,
            };
            if words.iter().all(String::is_empty) {
                return Err(DebugSpecError::EmptyWrapper(arg.to_owned()));
            }
            Confinement::Wrapped(words.into_iter().map(OsString::from).collect())
        }
    };
    Ok((name.to_owned(), confinement))
}

/// Splits at blanks; quotes group. `None` on an unbalanced quote.
fn split_words(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return None;
    }
    if in_word {
        words.push(cur);
    }
    Some(words)
}

/// A child to start confined; reusable, so that a crashed device starts again the same way.
#[derive(Clone, Debug)]
pub struct ConfinedCommand {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    confinement: Confinement,
    ids: Option<HostIds>,
    rlimits: Option<Rlimits>,
    cgroup: Result<CgroupLeaf, String>,
    process_group: bool,
    namespaces_missing: Option<String>,
    report: bool,
}

impl ConfinedCommand {
    /// A fully confined `program` named `name` in messages and reports, expecting a lockdown
    /// report from it (see [`Self::expect_report`]).
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            confinement: Confinement::Full,
            ids: None,
            rlimits: None,
            cgroup: Err("no delegated cgroup v2 was given".into()),
            process_group: false,
            namespaces_missing: None,
            report: true,
        }
    }

    pub fn arg(&mut self, arg: impl Into<OsString>) -> &mut Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(&mut self, args: I) -> &mut Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the child (the launcher's environment is inherited).
    pub fn env(&mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> &mut Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn confinement(&mut self, c: Confinement) -> &mut Self {
        self.confinement = c;
        self
    }

    /// The dedicated host ids (used when the launcher is root; otherwise the launcher's own
    /// ids are the only possible mapping). Without them a root launcher maps to uid/gid 0.
    pub fn ids(&mut self, ids: HostIds) -> &mut Self {
        self.ids = Some(ids);
        self
    }

    /// Rlimits set before `exec` (confined modes only).
    pub fn rlimits(&mut self, r: Rlimits) -> &mut Self {
        self.rlimits = Some(r);
        self
    }

    /// Starts the child in `leaf` (confined modes only).
    pub fn cgroup(&mut self, leaf: CgroupLeaf) -> &mut Self {
        self.cgroup = Ok(leaf);
        self
    }

    /// Records why the child has no cgroup of its own (for the report).
    pub fn no_cgroup(&mut self, why: impl Into<String>) -> &mut Self {
        self.cgroup = Err(why.into());
        self
    }

    /// Puts the child in a process group of its own (so a terminal's Ctrl-C reaches only
    /// the launcher).
    pub fn process_group(&mut self, on: bool) -> &mut Self {
        self.process_group = on;
        self
    }

    /// Starts a `Full` or `SeccompLog` child without namespaces, because the host has no
    /// usable user namespaces (`why`, for the report). Its lockdown then runs as if started
    /// by hand: no `pivot_root`; Landlock, capabilities, `no_new_privs` and seccomp (kill)
    /// still apply. `atoll --strict` refuses instead of calling this.
    pub fn without_namespaces(&mut self, why: impl Into<String>) -> &mut Self {
        self.namespaces_missing = Some(why.into());
        self
    }

    /// Whether the child sends a lockdown report (true for atoll's binaries, which call
    /// [`lockdown`](super::lockdown::lockdown()); false for any other program, which would
    /// otherwise hold the report pipe open).
    pub fn expect_report(&mut self, on: bool) -> &mut Self {
        self.report = on;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The mode the child's lockdown runs in.
    pub fn mode(&self) -> Mode {
        if self.confinement.namespaced() && self.namespaces_missing.is_some() {
            Mode::Standalone
        } else {
            self.confinement.mode()
        }
    }

    fn uses_namespaces(&self) -> bool {
        self.confinement.namespaced() && self.namespaces_missing.is_none()
    }

    fn err_nul(&self, what: impl Into<String>) -> SpawnError {
        SpawnError::Nul {
            name: self.name.clone(),
            what: what.into(),
        }
    }

    fn cstring(&self, s: &OsStr, what: &str) -> Result<CString, SpawnError> {
        CString::new(s.as_bytes()).map_err(|_| self.err_nul(what))
    }

    /// The program actually executed and its argv.
    fn command_line(&self) -> Result<(PathBuf, Vec<OsString>), SpawnError> {
        let mut argv: Vec<OsString> = Vec::new();
        let path = match &self.confinement {
            Confinement::Wrapped(wrapper) => {
                let first = wrapper.first().ok_or_else(|| SpawnError::EmptyWrapper {
                    name: self.name.clone(),
                })?;
                argv.extend(wrapper.iter().cloned());
                argv.push(self.program.clone().into_os_string());
                resolve_in_path(first).ok_or_else(|| SpawnError::NotInPath {
                    name: self.name.clone(),
                    program: first.clone(),
                })?
            }
            _ => {
                argv.push(self.program.clone().into_os_string());
                self.program.clone()
            }
        };
        argv.extend(self.args.iter().cloned());
        Ok((path, argv))
    }

    /// The child's environment: the launcher's, minus the confinement variables, plus the
    /// caller's and the mode's.
    fn environment(&self, report_fd: Option<RawFd>) -> Vec<OsString> {
        let ours = [super::CONFINE_ENV, super::REPORT_FD_ENV];
        let overridden: Vec<&OsStr> = self.env.iter().map(|(k, _)| k.as_os_str()).collect();
        let mut envp: Vec<OsString> = std::env::vars_os()
            .filter(|(k, _)| !ours.iter().any(|o| k == o) && !overridden.contains(&k.as_os_str()))
            .map(|(k, v)| join_env(&k, &v))
            .collect();
        envp.extend(
            self.env
                .iter()
                .filter(|(k, _)| !ours.iter().any(|o| k == o))
                .map(|(k, v)| join_env(k, v)),
        );
        if let Some(v) = self.mode().env_value() {
            envp.push(join_env(OsStr::new(super::CONFINE_ENV), OsStr::new(v)));
        }
        if let Some(fd) = report_fd {
            envp.push(join_env(
                OsStr::new(super::REPORT_FD_ENV),
                OsStr::new(&fd.to_string()),
            ));
        }
        envp
    }

    /// Starts the child with exactly stdio plus `fds` (each at its target; a target of 0..=2
    /// replaces that stdio descriptor). The child gets `SIGKILL` when the thread that
    /// spawned it ends (`PR_SET_PDEATHSIG` follows the thread): spawn from a thread that
    /// lives as long as the child should.
    pub fn spawn(&self, fds: &[Inherit<'_>]) -> Result<ConfinedChild, SpawnError> {
        let name = &self.name;
        let mut targets: Vec<RawFd> = fds.iter().map(|i| i.target).collect();
        targets.sort_unstable();
        if let Some(w) = targets.windows(2).find(|w| w[0] == w[1]) {
            return Err(SpawnError::BadTarget {
                name: name.clone(),
                target: w[0],
            });
        }
        if let Some(&t) = targets.first().filter(|&&t| t < 0) {
            return Err(SpawnError::BadTarget {
                name: name.clone(),
                target: t,
            });
        }
        if fds.len() + 1 > MAX_INHERITED {
            return Err(SpawnError::TooManyFds {
                name: name.clone(),
                count: fds.len(),
            });
        }
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|source| SpawnError::Pipe {
                name: name.clone(),
                source,
            })
        };
        let report_pipe = if self.report { Some(pipe()?) } else { None };
        let report_target = report_pipe
            .as_ref()
            .map(|_| targets.last().copied().unwrap_or(2).max(2) + 1);

        let (path, argv) = self.command_line()?;
        let c_path = self.cstring(path.as_os_str(), "the program path")?;
        let c_argv = argv
            .iter()
            .map(|a| self.cstring(a, "an argument"))
            .collect::<Result<Vec<_>, _>>()?;
        let c_env = self
            .environment(report_target)
            .iter()
            .map(|e| self.cstring(e, "an environment variable"))
            .collect::<Result<Vec<_>, _>>()?;
        let argv_ptrs = null_terminated(&c_argv);
        let env_ptrs = null_terminated(&c_env);

        let mut moves: Vec<(RawFd, RawFd)> =
            fds.iter().map(|i| (i.fd.as_raw_fd(), i.target)).collect();
        if let (Some((_, w)), Some(t)) = (&report_pipe, report_target) {
            moves.push((w.as_raw_fd(), t));
        }
        let max_target = moves.iter().map(|&(_, t)| t).max().unwrap_or(2).max(2);

        let namespaced = self.uses_namespaces();
        let confined = self.confinement.namespaced();
        let root = nix::unistd::geteuid().is_root();
        let (sync_r, sync_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let rlimits = if confined { self.rlimits } else { None };
        let cgroup = if confined {
            self.cgroup.as_ref().ok()
        } else {
            None
        };

        let plan = ChildPlan {
            path: c_path.as_ptr(),
            argv: argv_ptrs.as_ptr(),
            envp: env_ptrs.as_ptr(),
            moves: &moves,
            max_target,
            sync_r: sync_r.as_raw_fd(),
            sync_w: sync_w.as_raw_fd(),
            err_w: err_w.as_raw_fd(),
            switch_ids: namespaced,
            drop_groups: namespaced && root,
            process_group: self.process_group,
            no_new_privs: confined,
            rlimits: rlimits.map(|r| r.pairs()),
        };

        let mut flags = libc::CLONE_PIDFD as u64;
        if namespaced {
            flags |= all_namespace_flags();
        }
        if cgroup.is_some() {
            flags |= CLONE_INTO_CGROUP;
        }
        let cgroup_fd = cgroup.map(|l| l.as_fd().as_raw_fd());
        // SAFETY: `plan` points at memory prepared above, which the child gets a copy of (no
        // CLONE_VM); the child runs only `child_main`, which is async-signal-safe.
        let (pid, pidfd) = unsafe { clone_and_run(flags, cgroup_fd, &plan) }.map_err(|source| {
            SpawnError::Clone {
                name: name.clone(),
                source,
            }
        })?;
        drop(sync_r);
        drop(err_w);
        let report_reader = report_pipe.map(|(r, w)| {
            drop(w);
            File::from(r)
        });
        let mut child = ConfinedChild {
            name: name.clone(),
            pid,
            pidfd,
            status: None,
            report_reader,
            launcher: LauncherReport {
                name: name.clone(),
                pid,
                mode: self.mode(),
                wrapper: match &self.confinement {
                    Confinement::Wrapped(w) => Some(
                        w.iter()
                            .map(|a| a.to_string_lossy())
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    _ => None,
                },
                ids: None,
                namespaces: Vec::new(),
                namespaces_missing: if confined {
                    self.namespaces_missing.clone()
                } else {
                    None
                },
                rlimits,
                cgroup: match (cgroup, &self.cgroup) {
                    (Some(leaf), _) => CgroupReport::Leaf {
                        path: leaf.path().display().to_string(),
                        memory_max: leaf.limits().memory_max,
                        pids_max: leaf.limits().pids_max,
                        cpu_weight: leaf.limits().cpu_weight,
                    },
                    (None, Err(why)) if confined => CgroupReport::None(why.clone()),
                    (None, _) => CgroupReport::None("debug mode".into()),
                },
            },
        };
        if namespaced {
            let ids = match (root, self.ids) {
                (true, Some(ids)) => IdReport {
                    uid: ids.uid,
                    gid: ids.gid,
                    dedicated: true,
                },
                _ => IdReport {
                    uid: nix::unistd::geteuid().as_raw(),
                    gid: nix::unistd::getegid().as_raw(),
                    dedicated: false,
                },
            };
            if let Err(e) = write_id_maps(name, pid, ids, root) {
                // Closing the sync pipe unblocks the child, which then exits.
                drop(sync_w);
                let _ = child.wait();
                return Err(e);
            }
            child.launcher.ids = Some(ids);
            child.launcher.namespaces = NAMESPACES.iter().map(|&(n, _)| n.to_owned()).collect();
        }
        // Let the child go on, then learn whether it reached exec. The sync pipe stays open
        // until then: the child takes a hang-up on it for the parent's death.
        let go = nix::unistd::write(&sync_w, &[1]);
        let mut buf = [0u8; 8];
        let mut got = 0;
        let mut err_file = File::from(err_r);
        loop {
            match err_file.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    if got == buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        drop(sync_w);
        match got {
            0 if go.is_ok() => Ok(child),
            0 => {
                let _ = child.wait();
                Err(SpawnError::ChildPipe {
                    name: name.clone(),
                    len: 0,
                })
            }
            8 => {
                let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
                let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
                let _ = child.wait();
                Err(SpawnError::Child {
                    name: name.clone(),
                    step: Step::name(step),
                    program: path,
                    source: io::Error::from_raw_os_error(errno),
                })
            }
            len => {
                let _ = child.wait();
                Err(SpawnError::ChildPipe {
                    name: name.clone(),
                    len,
                })
            }
        }
    }
}

fn join_env(k: &OsStr, v: &OsStr) -> OsString {
    let mut e = k.to_owned();
    e.push("=");
    e.push(v);
    e
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// `program` itself if it names a path, else the first executable `PATH` entry.
fn resolve_in_path(program: &OsStr) -> Option<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok() && p.is_file())
}

/// Writes `setgroups` (deny, unless the launcher is root: then the child drops its
/// supplementary groups itself), `uid_map` and `gid_map` of the child `pid`.
fn write_id_maps(name: &str, pid: u32, ids: IdReport, root: bool) -> Result<(), SpawnError> {
    let write = |file: &str, text: String| {
        let path = PathBuf::from(format!("/proc/{pid}/{file}"));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|source| SpawnError::IdMap {
                name: name.to_owned(),
                path,
                source,
            })
    };
    if !root {
        write("setgroups", "deny".into())?;
    }
    write("uid_map", format!("0 {} 1\n", ids.uid))?;
    write("gid_map", format!("0 {} 1\n", ids.gid))
}

/// The steps of the child before `exec`, as reported through the error pipe.
#[derive(Clone, Copy)]
#[repr(u32)]
enum Step {
    Pdeathsig = 1,
    Sync,
    Setresgid,
    Setgroups,
    Setresuid,
    Setpgid,
    Signals,
    NoNewPrivs,
    MoveFds,
    PlaceFds,
    CloseFds,
    Rlimit,
    Exec,
}

impl Step {
    fn name(code: u32) -> &'static str {
        const NAMES: [&str; 13] = [
            "PR_SET_PDEATHSIG",
            "waiting for the parent",
            "setresgid",
            "setgroups",
            "setresuid",
            "setpgid",
            "resetting signals",
            "PR_SET_NO_NEW_PRIVS",
            "moving descriptors",
            "placing descriptors",
            "closing other descriptors",
            "setrlimit",
            "execve",
        ];
        usize::try_from(code)
            .ok()
            .and_then(|c| c.checked_sub(1))
            .and_then(|i| NAMES.get(i))
            .copied()
            .unwrap_or("an unknown step")
    }
}

/// Everything the child needs, prepared before `clone3`.
struct ChildPlan<'a> {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    moves: &'a [(RawFd, RawFd)],
    max_target: RawFd,
    sync_r: RawFd,
    sync_w: RawFd,
    err_w: RawFd,
    switch_ids: bool,
    drop_groups: bool,
    process_group: bool,
    no_new_privs: bool,
    rlimits: Option<[(libc::__rlimit_resource_t, u64); 4]>,
}

fn all_namespace_flags() -> u64 {
    NAMESPACES.iter().fold(0, |a, &(_, f)| a | f)
}

/// A fork-like `clone3` (no `CLONE_VM`, `SIGCHLD` on exit, a pidfd): returns the pid (0 in
/// the child) and, in the parent, the pidfd.
///
/// # Safety
///
/// In the child (pid 0) the caller may run only async-signal-safe code and must not return
/// into code that assumes the parent's threads, locks or descriptors.
unsafe fn fork_with_pidfd(
    flags: u64,
    cgroup: Option<RawFd>,
) -> Result<(u32, Option<OwnedFd>), Errno> {
    let mut pidfd: RawFd = -1;
    let args = libc::clone_args {
        flags: flags | libc::CLONE_PIDFD as u64,
        pidfd: &raw mut pidfd as u64,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: cgroup.map_or(0, |fd| u64::try_from(fd).unwrap_or(0)),
    };
    // SAFETY: `args` is a valid clone_args of the size passed; without CLONE_VM the child
    // gets a copy of this address space and continues here on its own copy of the stack.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if ret < 0 {
        return Err(Errno::last());
    }
    if ret == 0 {
        return Ok((0, None));
    }
    let pid = u32::try_from(ret).map_err(|_| Errno::EOVERFLOW)?;
    // SAFETY: CLONE_PIDFD stored a new descriptor in `pidfd` that nothing else owns.
    Ok((pid, Some(unsafe { OwnedFd::from_raw_fd(pidfd) })))
}

/// Clones the child, which runs [`child_main`] and never returns. Returns the child's pid and
/// pidfd.
///
/// # Safety
///
/// `plan`'s pointers must be valid.
unsafe fn clone_and_run(
    flags: u64,
    cgroup: Option<RawFd>,
    plan: &ChildPlan<'_>,
) -> Result<(u32, OwnedFd), Errno> {
    // SAFETY: the child branch below runs only child_main.
    let (pid, pidfd) = unsafe { fork_with_pidfd(flags, cgroup) }?;
    match pidfd {
        Some(fd) => Ok((pid, fd)),
        // SAFETY: this is the child; the caller guarantees `plan` is valid.
        None => unsafe { child_main(plan) },
    }
}

/// The child between `clone3` and `exec`: async-signal-safe raw system calls only.
///
/// # Safety
///
/// Must run only in a freshly cloned child; `plan` must be valid.
unsafe fn child_main(plan: &ChildPlan<'_>) -> ! {
    let mut err_w = plan.err_w;
    let fail = |err_w: RawFd, step: Step| -> ! {
        // SAFETY: __errno_location returns this thread's errno; write and _exit are
        // async-signal-safe and touch only the stack buffer.
        unsafe {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&(step as u32).to_ne_bytes());
            msg[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(err_w, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: raw system calls on descriptors and memory the plan owns (the child's copy);
    // nothing here allocates, locks or returns into the parent's code.
    unsafe {
        libc::close(plan.sync_w);
        let mut b = 0u8;
        loop {
            let n = libc::read(plan.sync_r, (&raw mut b).cast(), 1);
            if n == 1 {
                break;
            }
            if n == 0 {
                // The parent closed the pipe without a go: it failed or died.
                libc::_exit(127);
            }
            if *libc::__errno_location() != libc::EINTR {
                fail(err_w, Step::Sync);
            }
        }
        if plan.switch_ids {
            if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0 {
                fail(err_w, Step::Setresgid);
            }
            if plan.drop_groups
                && libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
            {
                fail(err_w, Step::Setgroups);
            }
            if libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0 {
                fail(err_w, Step::Setresuid);
            }
        }
        // After the id switch: changing the euid clears the parent-death signal. The parent
        // keeps its end of the sync pipe open until this child has exec'd, so a hang-up there
        // means it died before the signal was armed.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(err_w, Step::Pdeathsig);
        }
        let mut pfd = libc::pollfd {
            fd: plan.sync_r,
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&raw mut pfd, 1, 0) < 0 {
            fail(err_w, Step::Sync);
        }
        if pfd.revents & libc::POLLHUP != 0 {
            libc::_exit(127);
        }
        libc::close(plan.sync_r);
        if plan.process_group && libc::setpgid(0, 0) != 0 {
            fail(err_w, Step::Setpgid);
        }
        // Unblock everything; put ignored signals back to default (exec keeps "ignored").
        let empty = 0u64;
        if libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const empty,
            std::ptr::null::<u64>(),
            8,
        ) != 0
        {
            fail(err_w, Step::Signals);
        }
        // 1..=64: every signal number (sigaction refuses glibc's internal ones: harmless).
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &raw mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &raw const dfl, std::ptr::null_mut());
            }
        }
        if plan.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(err_w, Step::NoNewPrivs);
        }
        // Move the error pipe and every source above all targets first, so that no dup2
        // clobbers a descriptor still to be used.
        err_w = libc::fcntl(err_w, libc::F_DUPFD_CLOEXEC, plan.max_target + 1);
        if err_w < 0 {
            fail(plan.err_w, Step::MoveFds);
        }
        let mut moved = [0 as RawFd; MAX_INHERITED];
        for (slot, &(src, _)) in moved.iter_mut().zip(plan.moves) {
            let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, plan.max_target + 1);
            if fd < 0 {
                fail(err_w, Step::MoveFds);
            }
            *slot = fd;
        }
        for (&fd, &(_, target)) in moved.iter().zip(plan.moves) {
            // dup2 clears FD_CLOEXEC on the new descriptor, so it survives exec.
            if libc::dup2(fd, target) < 0 {
                fail(err_w, Step::PlaceFds);
            }
        }
        // Everything above the targets (the temporaries, the error pipe) closes at exec.
        let first = u32::try_from(plan.max_target + 1).unwrap_or(u32::MAX);
        if libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            fail(err_w, Step::CloseFds);
        }
        for fd in 3..=plan.max_target {
            if !plan.moves.iter().any(|&(_, t)| t == fd) {
                // EBADF for numbers that are not open: nothing to close.
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        if let Some(limits) = &plan.rlimits {
            for &(resource, value) in limits {
                let lim = libc::rlimit64 {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::syscall(
                    libc::SYS_prlimit64,
                    0,
                    resource,
                    &raw const lim,
                    std::ptr::null::<libc::rlimit64>(),
                ) != 0
                {
                    fail(err_w, Step::Rlimit);
                }
            }
        }
        libc::syscall(libc::SYS_execve, plan.path, plan.argv, plan.envp);
        fail(err_w, Step::Exec)
    }
}

/// A running (or exited) confined child.
#[derive(Debug)]
pub struct ConfinedChild {
    name: String,
    pid: u32,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
    report_reader: Option<File>,
    launcher: LauncherReport,
}

impl ConfinedChild {
    /// Its pid in the launcher's pid namespace.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pidfd: readable (`POLLIN`) once the child has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// What the launcher applied.
    pub fn launcher_report(&self) -> &LauncherReport {
        &self.launcher
    }

    /// Reaps the child if it has exited (`waitid(P_PIDFD, WNOHANG)`); `None` while it runs.
    /// Once reaped, returns the same status again.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, SpawnError> {
        self.wait_with(WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG)
    }

    /// Waits for the child to exit and reaps it.
    pub fn wait(&mut self) -> Result<ExitStatus, SpawnError> {
        loop {
            if let Some(s) = self.wait_with(WaitPidFlag::WEXITED)? {
                return Ok(s);
            }
        }
    }

    fn wait_with(&mut self, flags: WaitPidFlag) -> Result<Option<ExitStatus>, SpawnError> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let status = loop {
            match waitid(Id::PIDFd(self.pidfd.as_fd()), flags) {
                Err(Errno::EINTR) => {}
                other => break other,
            }
        };
        let raw = match status {
            Ok(WaitStatus::Exited(_, code)) => (code & 0xff) << 8,
            Ok(WaitStatus::Signaled(_, sig, core)) => sig as i32 | if core { 0x80 } else { 0 },
            Ok(_) => return Ok(None),
            Err(source) => {
                return Err(SpawnError::Wait {
                    name: self.name.clone(),
                    pid: self.pid,
                    source,
                });
            }
        };
        let s = ExitStatus::from_raw(raw);
        self.status = Some(s);
        Ok(Some(s))
    }

    /// Sends `signal` through the pidfd (never to a recycled pid). Fails with `ESRCH` once
    /// the child has exited.
    pub fn signal(&self, signal: Signal) -> Result<(), SpawnError> {
        // SAFETY: pidfd_send_signal with a valid pidfd, a null siginfo and no flags.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if ret != 0 {
            return Err(SpawnError::Signal {
                name: self.name.clone(),
                pid: self.pid,
                signal,
                source: Errno::last(),
            });
        }
        Ok(())
    }

    /// Kills the child (if it still runs) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, SpawnError> {
        if self.status.is_none() {
            match self.signal(Signal::SIGKILL) {
                Ok(())
                | Err(SpawnError::Signal {
                    source: Errno::ESRCH,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        self.wait()
    }

    /// Waits up to `timeout` for the child's lockdown report and returns the whole
    /// confinement report (with the process side marked missing if none came).
    pub fn read_report(&mut self, timeout: Duration) -> ConfinementReport {
        let process = match self.report_reader.take() {
            None => ProcessSide::Missing("no report was expected from this program".into()),
            Some(mut file) => match read_until_eof(&mut file, timeout) {
                Ok(bytes) if bytes.is_empty() => ProcessSide::Missing(
                    "it closed its report pipe without a report (did it exit?)".into(),
                ),
                Ok(bytes) => match postcard::from_bytes::<ProcessReport>(&bytes) {
                    Ok(r) => ProcessSide::Reported(r),
                    Err(e) => ProcessSide::Missing(format!("undecodable report: {e}")),
                },
                Err(why) => ProcessSide::Missing(why),
            },
        };
        ConfinementReport {
            launcher: self.launcher.clone(),
            process,
        }
    }
}

impl AsFd for ConfinedChild {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}

/// Reads `file` to its end within `timeout`.
fn read_until_eof(file: &mut File, timeout: Duration) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut pfd = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut pfd, PollTimeout::from(ms)) {
            Ok(0) if Instant::now() >= deadline => {
                return Err(format!("no report within {timeout:?}"));
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(format!("poll on the report pipe failed: {e}")),
        }
        if pfd[0].revents().is_none_or(|r| r.is_empty()) {
            continue;
        }
        match file.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the report pipe failed: {e}")),
        }
    }
}

/// Whether this host lets this process create the namespaces a confined child gets: a
/// throwaway child is cloned into them and exits at once.
pub(crate) fn probe_namespaces() -> Result<(), Errno> {
    // SAFETY: the child only calls _exit.
    let (_, pidfd) = unsafe { fork_with_pidfd(all_namespace_flags(), None) }?;
    let Some(pidfd) = pidfd else {
        // SAFETY: in the child: leave at once without running any of the parent's code.
        unsafe { libc::_exit(0) }
    };
    loop {
        match waitid(Id::PIDFd(pidfd.as_fd()), WaitPidFlag::WEXITED) {
            Err(Errno::EINTR) => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_the_launchers_block() {
        let mut a = IdAllocator::for_launcher(3);
        let first = a.allocate().unwrap();
        assert_eq!(first.uid, HOST_ID_BASE + 3 * 256);
        assert_eq!(first.uid, first.gid);
        assert_eq!(a.allocate().unwrap().uid, first.uid + 1);
        let mut b = IdAllocator::for_launcher(3 + LAUNCHER_ID_BLOCKS);
        assert_eq!(
            b.allocate().unwrap().uid,
            first.uid,
            "pids wrap modulo 65536"
        );
        let mut top = IdAllocator::for_launcher(LAUNCHER_ID_BLOCKS - 1);
        for _ in 0..IDS_PER_LAUNCHER {
            let ids = top.allocate().unwrap();
            assert!(ids.uid < HOST_ID_BASE + LAUNCHER_ID_BLOCKS * IDS_PER_LAUNCHER);
        }
        assert!(matches!(top.allocate(), Err(SpawnError::IdsExhausted)));
    }

    #[test]
    fn debug_device_specs() {
        assert_eq!(
            parse_debug_device("disk0=seccomp-log").unwrap(),
            ("disk0".into(), Confinement::SeccompLog)
        );
        assert_eq!(
            parse_debug_device("vmm-core=unconfined").unwrap(),
            ("vmm-core".into(), Confinement::Unconfined)
        );
        let words = |v: &[&str]| Confinement::Wrapped(v.iter().map(OsString::from).collect());
        assert_eq!(
            parse_debug_device("disk0=wrap:'strace -f -o /tmp/t'")
                .unwrap()
                .1,
            words(&["strace", "-f", "-o", "/tmp/t"])
        );
        assert_eq!(
            parse_debug_device("disk0=wrap:gdbserver :1234").unwrap().1,
            words(&["gdbserver", ":1234"])
        );
        assert_eq!(
            parse_debug_device("disk0=wrap:strace -o '/tmp/a b'")
                .unwrap()
                .1,
            words(&["strace", "-o", "/tmp/a b"])
        );
        assert_eq!(
            parse_debug_device("disk0=wrap:''"),
            Err(DebugSpecError::EmptyWrapper("disk0=wrap:''".into()))
        );
        assert_eq!(
            parse_debug_device("disk0=wrap:'strace"),
            Err(DebugSpecError::Quote("disk0=wrap:'strace".into()))
        );
        assert_eq!(
            parse_debug_device("=unconfined"),
            Err(DebugSpecError::NoName("=unconfined".into()))
        );
        assert!(matches!(
            parse_debug_device("disk0=loud"),
            Err(DebugSpecError::UnknownMode(_))
        ));
    }

    #[test]
    fn step_names() {
        assert_eq!(Step::name(Step::Exec as u32), "execve");
        assert_eq!(Step::name(Step::Pdeathsig as u32), "PR_SET_PDEATHSIG");
        assert_eq!(Step::name(0), "an unknown step");
        assert_eq!(Step::name(99), "an unknown step");
    }
}
