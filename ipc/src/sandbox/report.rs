//! What confinement a process got: the launcher's half ([`LauncherReport`], what
//! [`ConfinedCommand::spawn`](super::spawn::ConfinedCommand::spawn) applied), the process's
//! half ([`ProcessReport`], what [`lockdown`](super::lockdown::lockdown()) applied, sent back to
//! the launcher through the report pipe), and both together as the one line `atoll` prints per
//! process ([`ConfinementReport`]).

use super::Mode;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Resource limits set on a child before `exec` (soft and hard alike). `u64::MAX` means
/// unlimited (`RLIM_INFINITY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimits {
    /// `RLIMIT_NOFILE`: the highest descriptor number plus one the process may open.
    pub nofile: u64,
    /// `RLIMIT_NPROC`: processes plus threads of the child's uid in its user namespace, so
    /// in practice the threads of this one process. `vmm-core` needs one per vCPU plus its
    /// helpers; be generous.
    pub nproc: u64,
    /// `RLIMIT_CORE`: 0 (no core dumps) unless a debug mode asks for them.
    pub core: u64,
    /// `RLIMIT_FSIZE`: the largest file offset the process may write (`pwrite` beyond it
    /// raises `SIGXFSZ`), so at least the size of the largest image `dev-blk` writes.
    pub fsize: u64,
}

impl Rlimits {
    /// The limits as `(resource, value)` pairs.
    pub fn pairs(&self) -> [(libc::__rlimit_resource_t, u64); 4] {
        [
            (libc::RLIMIT_NOFILE, self.nofile),
            (libc::RLIMIT_NPROC, self.nproc),
            (libc::RLIMIT_CORE, self.core),
            (libc::RLIMIT_FSIZE, self.fsize),
        ]
    }
}

impl fmt::Display for Rlimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |n: u64| {
            if n == u64::MAX {
                "unlimited".to_owned()
            } else {
                n.to_string()
            }
        };
        write!(
            f,
            "nofile {} nproc {} core {} fsize {}",
            v(self.nofile),
            v(self.nproc),
            v(self.core),
            v(self.fsize)
        )
    }
}

/// The host uid and gid a child's namespace uid/gid 0 maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdReport {
    pub uid: u32,
    pub gid: u32,
    /// Whether they were chosen for this process alone (the launcher runs as root) or are
    /// the launcher's own (the only mapping an unprivileged launcher can write).
    pub dedicated: bool,
}

/// The cgroup a child was started in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupReport {
    /// Its own leaf, with the limits written there (`None`: no such limit).
    Leaf {
        path: String,
        memory_max: Option<u64>,
        pids_max: Option<u64>,
        cpu_weight: Option<u16>,
    },
    /// None of its own, and why.
    None(String),
}

/// What the launcher applied to a child before `exec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LauncherReport {
    /// The process's name in messages (`vmm-core`, `disk0`, ...).
    pub name: String,
    /// Its pid in the launcher's pid namespace.
    pub pid: u32,
    /// What it was started as.
    pub mode: Mode,
    /// The debugging wrapper's command line, when it runs under one.
    pub wrapper: Option<String>,
    /// The uid/gid mapping of its user namespace (`None`: no user namespace).
    pub ids: Option<IdReport>,
    /// The namespaces it got (`user`, `pid`, `mnt`, ...), empty for none.
    pub namespaces: Vec<String>,
    /// Why it got no namespaces although its mode asks for them.
    pub namespaces_missing: Option<String>,
    /// The rlimits set before `exec` (`None`: left as the launcher's).
    pub rlimits: Option<Rlimits>,
    /// Its cgroup.
    pub cgroup: CgroupReport,
}

/// Where the process's root directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootView {
    /// An empty read-only tmpfs (`pivot_root`).
    EmptyReadOnly,
    /// The host's (no mount namespace of its own).
    Host,
}

/// The outcome of the Landlock restriction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LandlockReport {
    /// Enforced with the kernel's ABI `abi`; `full` when every requested right is handled.
    Enforced { abi: u32, full: bool },
    /// Not available on this kernel, and why.
    Unavailable(String),
    /// Not attempted (unconfined).
    NotApplied,
}

/// The seccomp action on a system call outside the allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeccompReport {
    /// Kill the process (`SIGSYS`).
    Kill { syscalls: u32 },
    /// Log and allow.
    Log { syscalls: u32 },
    /// No filter.
    None,
}

/// What [`lockdown`](super::lockdown::lockdown()) applied, as the process reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessReport {
    /// The binary's policy name.
    pub name: String,
    /// The mode it locked down in.
    pub mode: Mode,
    pub root: RootView,
    pub landlock: LandlockReport,
    /// Capabilities are all zero (effective, permitted, inheritable, ambient).
    pub caps_dropped: bool,
    /// Capabilities left in the bounding set (0 unless the process lacked `CAP_SETPCAP` to
    /// drop them; `no_new_privs` keeps it from regaining any through `exec`).
    pub bounding_caps_left: u32,
    pub no_new_privs: bool,
    pub seccomp: SeccompReport,
    /// Descriptors open when the filter went on.
    pub open_fds: Vec<i32>,
    /// Anything that fell short, in sentences.
    pub warnings: Vec<String>,
}

impl ProcessReport {
    /// The report of a process that applied nothing (mode `none`).
    pub fn unconfined(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            mode: Mode::Unconfined,
            root: RootView::Host,
            landlock: LandlockReport::NotApplied,
            caps_dropped: false,
            bounding_caps_left: 0,
            no_new_privs: false,
            seccomp: SeccompReport::None,
            open_fds: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn fmt_fields(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mode == Mode::Unconfined {
            return write!(f, "nothing applied by the process");
        }
        match self.root {
            RootView::EmptyReadOnly => write!(f, "empty root")?,
            RootView::Host => write!(f, "host root")?,
        }
        match &self.landlock {
            LandlockReport::Enforced { abi, full: true } => write!(f, ", landlock ABI {abi}")?,
            LandlockReport::Enforced { abi, full: false } => {
                write!(f, ", landlock ABI {abi} (partial)")?
            }
            LandlockReport::Unavailable(why) => write!(f, ", landlock none ({why})")?,
            LandlockReport::NotApplied => write!(f, ", landlock none")?,
        }
        match (self.caps_dropped, self.bounding_caps_left) {
            (true, 0) => write!(f, ", caps none")?,
            (true, n) => write!(f, ", caps none ({n} left in the bounding set)")?,
            (false, _) => write!(f, ", caps KEPT")?,
        }
        if !self.no_new_privs {
            write!(f, ", no_new_privs OFF")?;
        }
        match self.seccomp {
            SeccompReport::Kill { syscalls } => write!(f, ", seccomp kill ({syscalls} syscalls)"),
            SeccompReport::Log { syscalls } => write!(f, ", seccomp log ({syscalls} syscalls)"),
            SeccompReport::None => write!(f, ", seccomp none"),
        }
    }
}

impl fmt::Display for ProcessReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} locked down ({:?}): ", self.name, self.mode)?;
        self.fmt_fields(f)?;
        write!(f, ", fds {:?}", self.open_fds)
    }
}

/// The process's half of a [`ConfinementReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcessSide {
    Reported(ProcessReport),
    /// The process sent no report, and what went wrong.
    Missing(String),
}

/// Both halves: what one process got, as `atoll` prints it at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfinementReport {
    pub launcher: LauncherReport,
    pub process: ProcessSide,
}

impl ConfinementReport {
    /// Sentences naming what this process lacks compared with full confinement.
    pub fn shortfalls(&self) -> Vec<String> {
        let l = &self.launcher;
        let mut out = Vec::new();
        match l.mode {
            Mode::Full => {}
            Mode::Standalone => {}
            other => out.push(format!("{} runs in debug mode {other:?}", l.name)),
        }
        if let Some(why) = &l.namespaces_missing {
            out.push(format!("{} has no namespaces of its own: {why}", l.name));
        }
        if let Some(ids) = l.ids
            && !ids.dedicated
        {
            out.push(format!(
                "{} runs as the launcher's own uid {} (not root: no dedicated uid)",
                l.name, ids.uid
            ));
        }
        if let CgroupReport::None(why) = &l.cgroup {
            out.push(format!("{} has no cgroup of its own: {why}", l.name));
        }
        match &self.process {
            ProcessSide::Missing(why) => {
                out.push(format!("{} did not report its lockdown: {why}", l.name))
            }
            ProcessSide::Reported(p) => {
                if let LandlockReport::Unavailable(why) = &p.landlock {
                    out.push(format!("{} has no Landlock restriction: {why}", l.name));
                }
                out.extend(p.warnings.iter().map(|w| format!("{}: {w}", l.name)));
            }
        }
        out
    }
}

impl fmt::Display for ConfinementReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.launcher;
        write!(f, "{} (pid {}): ", l.name, l.pid)?;
        match l.mode {
            Mode::Unconfined => write!(f, "UNCONFINED (debug), ")?,
            Mode::Wrapped => write!(
                f,
                "under wrapper `{}` (debug), ",
                l.wrapper.as_deref().unwrap_or("?")
            )?,
            Mode::SeccompLog => write!(f, "seccomp-log (debug), ")?,
            Mode::Full | Mode::Standalone => {}
        }
        match l.ids {
            Some(IdReport {
                uid,
                gid,
                dedicated: true,
            }) => write!(f, "uid {uid} gid {gid}, ")?,
            Some(IdReport { uid, gid, .. }) => write!(f, "uid {uid} gid {gid} (launcher's), ")?,
            None => write!(f, "uid unchanged, ")?,
        }
        if l.namespaces.is_empty() {
            write!(f, "ns none")?;
        } else {
            write!(f, "ns {}", l.namespaces.join("+"))?;
        }
        match &self.process {
            ProcessSide::Reported(p) => {
                write!(f, ", ")?;
                p.fmt_fields(f)?;
            }
            ProcessSide::Missing(why) => write!(f, ", process report missing ({why})")?,
        }
        match &l.rlimits {
            Some(r) => write!(f, ", rlimits {r}")?,
            None => write!(f, ", rlimits unchanged")?,
        }
        match &l.cgroup {
            CgroupReport::Leaf {
                path,
                memory_max,
                pids_max,
                cpu_weight,
            } => {
                write!(f, ", cgroup {path}")?;
                let parts: Vec<String> = [
                    memory_max.map(|m| format!("memory.max {m}")),
                    pids_max.map(|p| format!("pids.max {p}")),
                    cpu_weight.map(|w| format!("cpu.weight {w}")),
                ]
                .into_iter()
                .flatten()
                .collect();
                if parts.is_empty() {
                    write!(f, " (no limits)")
                } else {
                    write!(f, " ({})", parts.join(", "))
                }
            }
            CgroupReport::None(why) => write!(f, ", cgroup none ({why})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launcher() -> LauncherReport {
        LauncherReport {
            name: "vmm-core".into(),
            pid: 123,
            mode: Mode::Full,
            wrapper: None,
            ids: Some(IdReport {
                uid: 1_879_048_192,
                gid: 1_879_048_192,
                dedicated: true,
            }),
            namespaces: ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"]
                .map(String::from)
                .to_vec(),
            namespaces_missing: None,
            rlimits: Some(Rlimits {
                nofile: 64,
                nproc: 512,
                core: 0,
                fsize: u64::MAX,
            }),
            cgroup: CgroupReport::None("no delegated cgroup v2".into()),
        }
    }

    fn process() -> ProcessReport {
        ProcessReport {
            name: "vmm-core".into(),
            mode: Mode::Full,
            root: RootView::EmptyReadOnly,
            landlock: LandlockReport::Enforced { abi: 7, full: true },
            caps_dropped: true,
            bounding_caps_left: 0,
            no_new_privs: true,
            seccomp: SeccompReport::Kill { syscalls: 97 },
            open_fds: vec![0, 1, 2, 3],
            warnings: vec![],
        }
    }

    #[test]
    fn one_line_per_process() {
        let r = ConfinementReport {
            launcher: launcher(),
            process: ProcessSide::Reported(process()),
        };
        assert_eq!(
            r.to_string(),
            "vmm-core (pid 123): uid 1879048192 gid 1879048192, \
             ns user+pid+mnt+net+ipc+uts+cgroup, empty root, landlock ABI 7, caps none, \
             seccomp kill (97 syscalls), rlimits nofile 64 nproc 512 core 0 fsize unlimited, \
             cgroup none (no delegated cgroup v2)"
        );
        assert_eq!(
            r.shortfalls(),
            ["vmm-core has no cgroup of its own: no delegated cgroup v2"]
        );
    }

    #[test]
    fn debug_modes_and_missing_reports_are_visible() {
        let mut l = launcher();
        l.mode = Mode::Wrapped;
        l.wrapper = Some("strace -f -o /tmp/t".into());
        l.ids = None;
        l.namespaces.clear();
        l.rlimits = None;
        l.cgroup = CgroupReport::Leaf {
            path: "/sys/fs/cgroup/atoll-1/disk0".into(),
            memory_max: Some(1 << 30),
            pids_max: Some(64),
            cpu_weight: None,
        };
        let r = ConfinementReport {
            launcher: l,
            process: ProcessSide::Missing("it exited first".into()),
        };
        assert_eq!(
            r.to_string(),
            "vmm-core (pid 123): under wrapper `strace -f -o /tmp/t` (debug), uid unchanged, \
             ns none, process report missing (it exited first), rlimits unchanged, \
             cgroup /sys/fs/cgroup/atoll-1/disk0 (memory.max 1073741824, pids.max 64)"
        );
        let s = r.shortfalls();
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s[0].contains("debug mode Wrapped"), "{s:?}");
        assert!(s[1].contains("did not report"), "{s:?}");
    }

    #[test]
    fn report_survives_postcard() {
        let p = process();
        let bytes = postcard::to_allocvec(&p).unwrap();
        assert_eq!(postcard::from_bytes::<ProcessReport>(&bytes).unwrap(), p);
    }
}
