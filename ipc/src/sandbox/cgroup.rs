//! A cgroup v2 leaf per child: `<delegated>/atoll-<launcher pid>/<process name>`, with
//! `memory.max`, `pids.max` and `cpu.weight` where those controllers are enabled. Children
//! are started directly in their leaf (`CLONE_INTO_CGROUP`, see
//! [`ConfinedCommand::cgroup`](super::spawn::ConfinedCommand::cgroup)).
//!
//! The delegated cgroup is one the launcher may write: the launcher's own cgroup when it is
//! the root of a cgroup2 mount (a plain `cgroup2` mount as in the testbed, where the
//! no-internal-processes rule does not apply), or a cgroup whose `cgroup.subtree_control`
//! already enables the controllers, or one named by the caller. The launcher does not move
//! itself between cgroups.
//!
//! [`CgroupTree`] removes the leaves and its own directory when dropped; its children must
//! have been reaped by then (a cgroup with live processes cannot be removed).

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Errors of finding, creating or filling cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {value:?} to {}", .path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the cgroup {}", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the cgroup {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("this process is in no cgroup v2 hierarchy (no \"0::\" line in /proc/self/cgroup)")]
    NotInCgroup2,
    #[error("no cgroup2 filesystem is mounted over this process's cgroup {0}")]
    NoMount(String),
    #[error(
        "the cgroup {} lacks the {missing} controller{} (it offers: {offered})",
        .path.display(), if .missing.contains(' ') { "s" } else { "" }
    )]
    MissingControllers {
        path: PathBuf,
        missing: String,
        offered: String,
    },
    #[error("{0:?} is not a valid cgroup leaf name (one path component, not cgroup.*)")]
    BadName(String),
}

/// The controllers a leaf may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Controllers {
    pub memory: bool,
    pub pids: bool,
    pub cpu: bool,
}

impl Controllers {
    fn parse(text: &str) -> Self {
        let has = |name: &str| text.split_whitespace().any(|c| c == name);
        Self {
            memory: has("memory"),
            pids: has("pids"),
            cpu: has("cpu"),
        }
    }

    fn names(self) -> Vec<&'static str> {
        [
            (self.memory, "memory"),
            (self.pids, "pids"),
            (self.cpu, "cpu"),
        ]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect()
    }

    fn intersect(self, other: Self) -> Self {
        Self {
            memory: self.memory && other.memory,
            pids: self.pids && other.pids,
            cpu: self.cpu && other.cpu,
        }
    }
}

/// The limits of one leaf (`None`: leave unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// `memory.max` in bytes.
    pub memory_max: Option<u64>,
    /// `pids.max`: processes plus threads.
    pub pids_max: Option<u64>,
    /// `cpu.weight`, 1..=10000 (100 is the default share).
    pub cpu_weight: Option<u16>,
}

/// The cgroup v2 directory of this process: the `0::` line of `/proc/self/cgroup` resolved
/// against the cgroup2 mount in `/proc/self/mountinfo`.
pub fn own_cgroup() -> Result<PathBuf, CgroupError> {
    let read = |p: &str| {
        fs::read_to_string(p).map_err(|source| CgroupError::Read {
            path: p.into(),
            source,
        })
    };
    resolve_own_cgroup(&read("/proc/self/cgroup")?, &read("/proc/self/mountinfo")?)
}

/// [`own_cgroup`] on given file contents.
fn resolve_own_cgroup(cgroup: &str, mountinfo: &str) -> Result<PathBuf, CgroupError> {
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NotInCgroup2)?;
    for line in mountinfo.lines() {
        // "36 35 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let root = unescape_mountinfo(root);
        let rel = if root == "/" {
            Some(path)
        } else {
            path.strip_prefix(root.as_str())
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        if let Some(rel) = rel {
            let mut dir = PathBuf::from(unescape_mountinfo(mount_point));
            let rel = rel.trim_start_matches('/');
            if !rel.is_empty() {
                dir.push(rel);
            }
            return Ok(dir);
        }
    }
    Err(CgroupError::NoMount(path.to_owned()))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(oct) = s.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(oct, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_file(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    // O_TRUNC as a shell's `>` does: cgroupfs ignores it, a plain file (tests) needs it.
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| io::Write::write_all(&mut f, value.as_bytes()))
        .map_err(|source| CgroupError::Write {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        })
}

/// `<delegated>/atoll-<launcher pid>`: the launcher's subtree, removed on drop.
#[derive(Debug)]
pub struct CgroupTree {
    dir: PathBuf,
    controllers: Controllers,
    leaves: Mutex<Vec<PathBuf>>,
}

impl CgroupTree {
    /// Creates `atoll-<this pid>` under `delegated` with the memory and pids controllers
    /// (and cpu when offered) enabled for its leaves. Fails, naming what is missing, when
    /// `delegated` does not offer memory and pids or they cannot be enabled.
    pub fn create(delegated: &Path) -> Result<Self, CgroupError> {
        Self::create_requiring(
            delegated,
            Controllers {
                memory: true,
                pids: true,
                cpu: false,
            },
        )
    }

    /// Like [`Self::create`], requiring only the controllers in `required` (the others are
    /// enabled when offered).
    pub fn create_requiring(delegated: &Path, required: Controllers) -> Result<Self, CgroupError> {
        let offered_text = read_file(&delegated.join("cgroup.controllers"))?;
        let offered = Controllers::parse(&offered_text);
        let wanted_missing: Vec<&str> = required
            .names()
            .into_iter()
            .filter(|n| !offered.names().contains(n))
            .collect();
        if !wanted_missing.is_empty() {
            let offered_text = offered_text.trim();
            return Err(CgroupError::MissingControllers {
                path: delegated.to_owned(),
                missing: wanted_missing.join(" "),
                offered: if offered_text.is_empty() {
                    "none".into()
                } else {
                    offered_text.into()
                },
            });
        }
        let use_ctl = offered.intersect(Controllers {
            memory: true,
            pids: true,
            cpu: true,
        });
        enable(delegated, use_ctl, required)?;
        let dir = delegated.join(format!("atoll-{}", std::process::id()));
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Create { path: dir, source }),
        }
        let mut tree = Self {
            dir,
            controllers: Controllers::default(),
            leaves: Mutex::new(Vec::new()),
        };
        // On failure `tree` is dropped, which removes the directory again.
        tree.controllers = enable(&tree.dir, use_ctl, required)?;
        Ok(tree)
    }

    /// The subtree's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The controllers its leaves have.
    pub fn controllers(&self) -> Controllers {
        self.controllers
    }

    /// Creates (or reuses) the leaf `name` with `limits` written where its controllers
    /// allow, and opens it for `CLONE_INTO_CGROUP`.
    pub fn leaf(&self, name: &str, limits: CgroupLimits) -> Result<CgroupLeaf, CgroupError> {
        if name.is_empty()
            || name.contains('/')
            || name == "."
            || name == ".."
            || name.starts_with("cgroup.")
        {
            return Err(CgroupError::BadName(name.to_owned()));
        }
        let path = self.dir.join(name);
        match fs::create_dir(&path) {
            Ok(()) => self
                .leaves
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(path.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Create { path, source }),
        }
        let mut applied = CgroupLimits::default();
        if let Some(m) = limits.memory_max.filter(|_| self.controllers.memory) {
            write_file(&path.join("memory.max"), &m.to_string())?;
            applied.memory_max = Some(m);
        }
        if let Some(p) = limits.pids_max.filter(|_| self.controllers.pids) {
            write_file(&path.join("pids.max"), &p.to_string())?;
            applied.pids_max = Some(p);
        }
        if let Some(w) = limits.cpu_weight.filter(|_| self.controllers.cpu) {
            write_file(&path.join("cpu.weight"), &w.to_string())?;
            applied.cpu_weight = Some(w);
        }
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| CgroupError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(CgroupLeaf {
            path,
            dir: Arc::new(OwnedFd::from(dir)),
            limits: applied,
        })
    }
}

/// Enables `wanted` in `dir`'s `cgroup.subtree_control` (those not enabled yet); returns what
/// is enabled afterwards among `wanted`. Failing to enable a `required` one is an error; an
/// optional one is left out.
fn enable(
    dir: &Path,
    wanted: Controllers,
    required: Controllers,
) -> Result<Controllers, CgroupError> {
    let control = dir.join("cgroup.subtree_control");
    let mut have = Controllers::parse(&read_file(&control)?).intersect(wanted);
    for name in wanted.names() {
        if have.names().contains(&name) {
            continue;
        }
        match write_file(&control, &format!("+{name}")) {
            Ok(()) => match name {
                "memory" => have.memory = true,
                "pids" => have.pids = true,
                _ => have.cpu = true,
            },
            Err(e) if required.names().contains(&name) => return Err(e),
            Err(e) => tracing::debug!("optional cgroup controller left out: {e}"),
        }
    }
    Ok(have)
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        let leaves = std::mem::take(self.leaves.get_mut().unwrap_or_else(|p| p.into_inner()));
        for leaf in leaves.iter().rev() {
            if let Err(e) = fs::remove_dir(leaf) {
                tracing::warn!("cannot remove the cgroup {}: {e}", leaf.display());
            }
        }
        if let Err(e) = fs::remove_dir(&self.dir) {
            tracing::warn!("cannot remove the cgroup {}: {e}", self.dir.display());
        }
    }
}

/// One process's cgroup: its path, an open descriptor of it for `CLONE_INTO_CGROUP`, and the
/// limits written there. Cheap to clone (the descriptor is shared).
#[derive(Clone, Debug)]
pub struct CgroupLeaf {
    path: PathBuf,
    dir: Arc<OwnedFd>,
    limits: CgroupLimits,
}

impl CgroupLeaf {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits that were written.
    pub fn limits(&self) -> CgroupLimits {
        self.limits
    }
}

impl AsFd for CgroupLeaf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cgroup_resolves_against_the_cgroup2_mount() {
        let mountinfo = "\
24 1 8:1 / / rw,relatime - ext4 /dev/root rw
35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
36 24 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory";
        assert_eq!(
            resolve_own_cgroup("4:memory:/x\n0::/user.slice/a\n", mountinfo).unwrap(),
            Path::new("/sys/fs/cgroup/unified/user.slice/a")
        );
        assert_eq!(
            resolve_own_cgroup("0::/\n", mountinfo)
                .unwrap()
                .to_str()
                .unwrap(),
            "/sys/fs/cgroup/unified"
        );
        // A mount of a subtree (as inside a container), with an escaped space.
        let sub = "40 24 0:30 /ctr /mnt/cg\\040x rw - cgroup2 cgroup2 rw";
        assert_eq!(
            resolve_own_cgroup("0::/ctr/app\n", sub).unwrap(),
            Path::new("/mnt/cg x/app")
        );
        assert!(matches!(
            resolve_own_cgroup("0::/other\n", sub),
            Err(CgroupError::NoMount(p)) if p == "/other"
        ));
        assert!(matches!(
            resolve_own_cgroup("4:memory:/\n", mountinfo),
            Err(CgroupError::NotInCgroup2)
        ));
    }

    /// A directory tree that looks like cgroupfs to this module (plain files stand in for the
    /// kernel's), so the creation logic runs without a delegated cgroup.
    fn fake_delegated(offered: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "atoll-fake-cgroup-{}-{}",
            std::process::id(),
            offered.replace(' ', "-")
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cgroup.controllers"), offered).unwrap();
        fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
        dir
    }

    #[test]
    fn missing_controllers_are_named() {
        let dir = fake_delegated("cpu hugetlb");
        let err = CgroupTree::create(&dir).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the cgroup {} lacks the memory pids controllers (it offers: cpu hugetlb)",
                dir.display()
            )
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tree_and_leaf_limits_on_a_fake_hierarchy() {
        let dir = fake_delegated("cpu memory pids io");
        // The kernel creates the control files with the directory; the fake tree needs them
        // up front (leaf() reuses an existing leaf directory).
        let tree_dir = dir.join(format!("atoll-{}", std::process::id()));
        let leaf_dir = tree_dir.join("disk0");
        fs::create_dir_all(&leaf_dir).unwrap();
        fs::write(tree_dir.join("cgroup.subtree_control"), "").unwrap();
        for f in ["memory.max", "pids.max", "cpu.weight"] {
            fs::write(leaf_dir.join(f), "max").unwrap();
        }
        let tree = CgroupTree::create(&dir).unwrap();
        assert_eq!(tree.path(), tree_dir);
        assert_eq!(
            tree.controllers(),
            Controllers {
                memory: true,
                pids: true,
                cpu: true
            }
        );
        // Each controller was enabled with its own write; the fake file keeps the last.
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap(),
            "+cpu"
        );
        let limits = CgroupLimits {
            memory_max: Some(256 << 20),
            pids_max: Some(64),
            cpu_weight: None,
        };
        let leaf = tree.leaf("disk0", limits).unwrap();
        assert_eq!(leaf.limits(), limits);
        assert_eq!(
            fs::read_to_string(leaf_dir.join("memory.max")).unwrap(),
            "268435456"
        );
        assert_eq!(fs::read_to_string(leaf_dir.join("pids.max")).unwrap(), "64");
        assert_eq!(
            fs::read_to_string(leaf_dir.join("cpu.weight")).unwrap(),
            "max"
        );
        for bad in ["", "a/b", "..", "cgroup.procs"] {
            assert!(matches!(
                tree.leaf(bad, limits),
                Err(CgroupError::BadName(_))
            ));
        }
        drop(leaf);
        fs::remove_dir_all(&dir).unwrap();
    }
}
