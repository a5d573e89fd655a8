//! What the host supports of atoll's confinement, and the warnings `atoll` prints at start
//! (or, under `--strict`, the reasons it refuses to start).

use super::cgroup::{self, CgroupTree};
use nix::errno::Errno;
use std::fmt;
use std::path::PathBuf;

/// One capability of the host: available, or not and why.
pub type Support<T> = Result<T, String>;

/// What the host supports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSupport {
    /// New user, pid, mount, network, ipc, uts and cgroup namespaces can be created (a
    /// throwaway child was cloned into them).
    pub namespaces: Support<()>,
    /// The launcher runs as root, so children get dedicated host uids.
    pub root: bool,
    /// The kernel's Landlock ABI version.
    pub landlock_abi: Support<u32>,
    /// seccomp filters with the kill-process and log actions.
    pub seccomp: Support<()>,
    /// A delegated cgroup v2 that offers the memory and pids controllers.
    pub cgroup: Support<PathBuf>,
}

/// `--strict` and the host lacks something.
#[derive(Debug, thiserror::Error)]
#[error("--strict: refusing to start: {}", .0.join("; "))]
pub struct StrictError(pub Vec<String>);

impl HostSupport {
    /// Sentences naming each missing piece and what it costs.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if let Err(why) = &self.namespaces {
            w.push(format!(
                "cannot create user/pid/mount/network/ipc/uts namespaces ({why}): processes \
                 run without namespaces and see the host's filesystem, network and processes"
            ));
        }
        if !self.root {
            w.push(
                "atoll is not running as root: each process's user namespace maps to your own \
                 uid, not to a dedicated one"
                    .to_owned(),
            );
        }
        if let Err(why) = &self.landlock_abi {
            w.push(format!(
                "Landlock is not available ({why}): no process is restricted from the \
                 filesystem by Landlock"
            ));
        }
        if let Err(why) = &self.seccomp {
            w.push(format!(
                "seccomp filters are not available ({why}): processes have no system-call \
                 allow-list"
            ));
        }
        if let Err(why) = &self.cgroup {
            w.push(format!(
                "no delegated cgroup v2 with the memory and pids controllers ({why}): \
                 processes run without memory and pids limits"
            ));
        }
        w
    }

    /// `Ok` when nothing is missing; otherwise every warning, for `--strict`.
    pub fn strict(&self) -> Result<(), StrictError> {
        let w = self.warnings();
        if w.is_empty() {
            Ok(())
        } else {
            Err(StrictError(w))
        }
    }
}

impl fmt::Display for HostSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes_no = |r: &Support<()>| match r {
            Ok(()) => "yes".to_owned(),
            Err(why) => format!("no ({why})"),
        };
        write!(
            f,
            "namespaces {}, root {}, landlock {}, seccomp {}, cgroup {}",
            yes_no(&self.namespaces),
            if self.root { "yes" } else { "no" },
            match &self.landlock_abi {
                Ok(abi) => format!("ABI {abi}"),
                Err(why) => format!("no ({why})"),
            },
            yes_no(&self.seccomp),
            match &self.cgroup {
                Ok(p) => p.display().to_string(),
                Err(why) => format!("no ({why})"),
            },
        )
    }
}

/// The kernel's Landlock ABI (`landlock_create_ruleset(NULL, 0, VERSION)`).
pub fn landlock_abi() -> Support<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag the call only
    // returns the ABI version.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if ret >= 0 {
        return u32::try_from(ret).map_err(|_| format!("ABI {ret} out of range"));
    }
    Err(match Errno::last() {
        Errno::ENOSYS => "the kernel is built without it".to_owned(),
        Errno::EOPNOTSUPP => "built in but not enabled at boot (lsm=)".to_owned(),
        e => format!("landlock_create_ruleset: {e}"),
    })
}

/// Whether seccomp offers the kill-process and log actions.
pub fn seccomp() -> Support<()> {
    const SECCOMP_GET_ACTION_AVAIL: libc::c_uint = 2;
    for (action, name) in [
        (libc::SECCOMP_RET_KILL_PROCESS, "kill-process"),
        (libc::SECCOMP_RET_LOG, "log"),
    ] {
        let a: u32 = action;
        // SAFETY: SECCOMP_GET_ACTION_AVAIL reads the u32 `a` and changes nothing.
        let ret =
            unsafe { libc::syscall(libc::SYS_seccomp, SECCOMP_GET_ACTION_AVAIL, 0, &raw const a) };
        if ret != 0 {
            return Err(format!("the {name} action: {}", Errno::last()));
        }
    }
    Ok(())
}

/// The delegated cgroup: `explicit` if given, else this process's own cgroup, checked to
/// offer the memory and pids controllers.
pub fn delegated_cgroup(explicit: Option<PathBuf>) -> Support<PathBuf> {
    let dir = match explicit {
        Some(d) => d,
        None => cgroup::own_cgroup().map_err(|e| e.to_string())?,
    };
    let text = std::fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(|e| format!("cannot read {}/cgroup.controllers: {e}", dir.display()))?;
    let has = |c: &str| text.split_whitespace().any(|x| x == c);
    if has("memory") && has("pids") {
        Ok(dir)
    } else {
        Err(format!(
            "{} offers only: {}",
            dir.display(),
            if text.trim().is_empty() {
                "no controllers"
            } else {
                text.trim()
            }
        ))
    }
}

/// Probes the host (`cgroup`: a delegated cgroup named by the user, if any).
pub fn probe_with(cgroup: Option<PathBuf>) -> HostSupport {
    HostSupport {
        namespaces: super::spawn::probe_namespaces().map_err(|e| match e {
            Errno::EPERM | Errno::ENOSPC | Errno::EUSERS => format!(
                "{e}: user namespaces are disabled or limited \
                 (user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor)"
            ),
            e => e.to_string(),
        }),
        root: nix::unistd::geteuid().is_root(),
        landlock_abi: landlock_abi(),
        seccomp: seccomp(),
        cgroup: delegated_cgroup(cgroup),
    }
}

/// Probes the host, looking for a delegated cgroup where the launcher itself is.
pub fn probe() -> HostSupport {
    probe_with(None)
}

/// Creates the launcher's cgroup subtree when the probe found a delegated cgroup.
pub fn cgroup_tree(support: &HostSupport) -> Support<CgroupTree> {
    let dir = support.cgroup.as_ref().map_err(Clone::clone)?;
    CgroupTree::create(dir).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host() {
        let s = probe();
        // The development hosts and the testbed have these; a host without them must fail
        // this test rather than pass it silently.
        assert_eq!(s.namespaces, Ok(()), "{s}");
        assert_eq!(s.seccomp, Ok(()), "{s}");
        let abi = s.landlock_abi.clone().expect("Landlock");
        assert!(abi >= 1, "{s}");
        assert_eq!(s.root, nix::unistd::geteuid().is_root());
        // Whatever the cgroup answer is, warnings() reports it consistently.
        assert_eq!(
            s.cgroup.is_err(),
            s.warnings().iter().any(|w| w.contains("cgroup v2")),
            "{s}"
        );
    }

    #[test]
    fn warnings_name_what_is_missing_and_strict_refuses() {
        let s = HostSupport {
            namespaces: Err("EPERM".into()),
            root: false,
            landlock_abi: Err("the kernel is built without it".into()),
            seccomp: Ok(()),
            cgroup: Err("/sys/fs/cgroup/unified offers only: hugetlb".into()),
        };
        let w = s.warnings();
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[0].starts_with("cannot create user/pid/mount"), "{w:?}");
        assert!(w[1].contains("not running as root"), "{w:?}");
        assert!(w[2].contains("Landlock is not available"), "{w:?}");
        assert!(w[3].contains("offers only: hugetlb"), "{w:?}");
        let err = s.strict().unwrap_err().to_string();
        assert!(
            err.starts_with("--strict: refusing to start: cannot create"),
            "{err}"
        );
        let full = HostSupport {
            namespaces: Ok(()),
            root: true,
            landlock_abi: Ok(7),
            seccomp: Ok(()),
            cgroup: Ok("/sys/fs/cgroup".into()),
        };
        assert!(full.warnings().is_empty());
        assert!(full.strict().is_ok());
        assert_eq!(
            full.to_string(),
            "namespaces yes, root yes, landlock ABI 7, seccomp yes, cgroup /sys/fs/cgroup"
        );
    }

    #[test]
    fn delegated_cgroup_explains_missing_controllers() {
        let dir = std::env::temp_dir().join(format!("atoll-probe-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), "hugetlb\n").unwrap();
        let err = delegated_cgroup(Some(dir.clone())).unwrap_err();
        assert_eq!(err, format!("{} offers only: hugetlb", dir.display()));
        std::fs::write(dir.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        assert_eq!(delegated_cgroup(Some(dir.clone())), Ok(dir.clone()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
