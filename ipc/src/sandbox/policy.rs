//! Per-binary seccomp allow-lists and what else a binary tells [`lockdown`](super::lockdown()):
//! the descriptors it expects to hold when it locks down.
//!
//! A [`Policy`] is built by each binary (`vmm-core/src/seccomp.rs`, `dev-blk/src/seccomp.rs`)
//! on top of [`Policy::runtime`], the calls the Rust standard library and glibc make on their
//! own (threads, allocation, signals, time). It compiles into two `seccompiler` filters:
//! - the allow-list: every listed call (with its argument conditions) is allowed, anything
//!   else gets the mode's action (kill the process, or log);
//! - a one-rule filter that makes `clone3` fail with `ENOSYS`: `clone3` takes its flags in
//!   memory, where seccomp cannot look, so glibc is made to fall back to `clone`, whose flags
//!   the allow-list checks (threads only, no new namespaces, no new processes).
//!
//! When both filters match, the kernel applies the stricter action (`ERRNO` beats `ALLOW`).

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// Errors of compiling a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("seccomp policy of {name}: condition on argument {index} of syscall {syscall}")]
    Condition {
        name: String,
        syscall: i64,
        index: u8,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("seccomp policy of {name}: rule for syscall {syscall}")]
    Rule {
        name: String,
        syscall: i64,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("seccomp policy of {name}: this architecture ({arch}) has no seccompiler target")]
    Arch {
        name: String,
        arch: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("seccomp policy of {name}: compiling the filter")]
    Compile {
        name: String,
        #[source]
        source: seccompiler::BackendError,
    },
}

/// A condition on one system-call argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// The whole 64-bit argument equals the value.
    Eq { index: u8, value: u64 },
    /// The low 32 bits equal the value (arguments the kernel reads as `int`/`unsigned int`,
    /// such as ioctl request numbers, `fcntl` commands and `prctl` options).
    Eq32 { index: u8, value: u32 },
    /// `argument & mask == value` on the full 64 bits.
    Masked { index: u8, mask: u64, value: u64 },
}

impl Arg {
    fn condition(self) -> Result<SeccompCondition, (u8, seccompiler::BackendError)> {
        let (index, len, op, value) = match self {
            Self::Eq { index, value } => (index, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value),
            Self::Eq32 { index, value } => (
                index,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                u64::from(value),
            ),
            Self::Masked { index, mask, value } => (
                index,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(mask),
                value,
            ),
        };
        SeccompCondition::new(index, len, op, value).map_err(|e| (index, e))
    }
}

/// What happens on a system call outside the allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The kernel kills the process (`SIGSYS`, `SECCOMP_RET_KILL_PROCESS`).
    Kill,
    /// The kernel logs the call (audit record type 1326) and lets it run
    /// (`SECCOMP_RET_LOG`).
    Log,
}

/// When a listed system call is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Allowed {
    /// With any arguments.
    Always,
    /// When all conditions of at least one rule hold.
    When(Vec<Vec<Arg>>),
}

/// The namespace-creating `clone` flags; none may appear in a `clone` a confined process makes.
const CLONE_NEW_ANY: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;
/// `CLONE_THREAD`, which every `clone` of a confined process must carry: threads, never new
/// processes.
const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;

/// A binary's seccomp allow-list plus the descriptors it holds when it locks down.
#[derive(Clone, Debug)]
pub struct Policy {
    name: String,
    rules: BTreeMap<i64, Allowed>,
    expected_fds: Vec<RawFd>,
    remove_beneath: Vec<PathBuf>,
}

impl Policy {
    /// An empty policy for the binary `name` (used in messages and reports).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            rules: BTreeMap::new(),
            expected_fds: Vec::new(),
            remove_beneath: Vec::new(),
        }
    }

    /// A policy holding what every Rust binary of atoll needs from the runtime, found by
    /// reading the standard library's and glibc's code paths and confirmed with `strace -f` on
    /// `vmm-core` and `dev-blk` (see the binaries' `seccomp.rs`):
    /// - memory: `brk`, `mmap`, `munmap`, `mremap`, `mprotect` (thread guard pages),
    ///   `madvise` (glibc returns freed thread stacks and arenas);
    /// - threads: `clone` (threads only, see [`Policy`]), `clone3` (turned into `ENOSYS`),
    ///   `set_robust_list`, `rseq`, `futex`, `sched_yield`, `gettid`, `exit`,
    ///   `sched_getaffinity` (glibc sizes thread-local arenas with it), `prctl(PR_SET_NAME)`
    ///   (thread names);
    /// - signals: `rt_sigprocmask`, `rt_sigaction`, `rt_sigreturn`, `sigaltstack` (Rust's
    ///   stack-overflow handler per thread), `tgkill` to this process only (`abort`,
    ///   `pthread_kill`), `getpid`;
    /// - time: `clock_gettime`, `clock_nanosleep`, `nanosleep` (vDSO fallbacks, sleeps);
    /// - `getrandom` (hash-map seeds), `write` (logging to stderr, the confinement report),
    ///   `close`, `fcntl(F_GETFD)` (debug builds check descriptors they close), `exit_group`,
    ///   `restart_syscall`.
    pub fn runtime(name: impl Into<String>) -> Self {
        let own_pid = u64::from(std::process::id());
        Self::new(name)
            .allow(&[
                libc::SYS_brk,
                libc::SYS_mmap,
                libc::SYS_munmap,
                libc::SYS_mremap,
                libc::SYS_mprotect,
                libc::SYS_madvise,
                libc::SYS_clone3,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_futex,
                libc::SYS_sched_yield,
                libc::SYS_gettid,
                libc::SYS_getpid,
                libc::SYS_exit,
                libc::SYS_exit_group,
                libc::SYS_sched_getaffinity,
                libc::SYS_rt_sigprocmask,
                libc::SYS_rt_sigaction,
                libc::SYS_rt_sigreturn,
                libc::SYS_sigaltstack,
                libc::SYS_clock_gettime,
                libc::SYS_clock_nanosleep,
                libc::SYS_nanosleep,
                libc::SYS_getrandom,
                libc::SYS_write,
                libc::SYS_close,
                libc::SYS_restart_syscall,
            ])
            .allow_if(
                libc::SYS_clone,
                &[Arg::Masked {
                    index: 0,
                    mask: CLONE_THREAD | CLONE_NEW_ANY,
                    value: CLONE_THREAD,
                }],
            )
            // Rust's standard library checks, in debug builds, that a descriptor it closes is
            // open (`OwnedFd`'s drop).
            .allow_if(
                libc::SYS_fcntl,
                &[Arg::Eq32 {
                    index: 1,
                    value: libc::F_GETFD as u32,
                }],
            )
            .allow_if(
                libc::SYS_prctl,
                &[Arg::Eq32 {
                    index: 0,
                    value: libc::PR_SET_NAME as u32,
                }],
            )
            .allow_if(
                libc::SYS_tgkill,
                &[Arg::Eq {
                    index: 0,
                    value: own_pid,
                }],
            )
    }

    /// The binary's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Allows each of `syscalls` with any arguments.
    pub fn allow(mut self, syscalls: &[i64]) -> Self {
        for &nr in syscalls {
            self.rules.insert(nr, Allowed::Always);
        }
        self
    }

    /// Allows `syscall` when every condition in `args` holds; several calls for the same
    /// system call allow it when any of their rules holds. A call already allowed with any
    /// arguments stays so.
    pub fn allow_if(mut self, syscall: i64, args: &[Arg]) -> Self {
        match self
            .rules
            .entry(syscall)
            .or_insert(Allowed::When(Vec::new()))
        {
            Allowed::Always => {}
            Allowed::When(rules) => rules.push(args.to_vec()),
        }
        self
    }

    /// Allows `syscall` when its argument `index` (its low 32 bits) is one of `values`.
    pub fn allow_arg_values(mut self, syscall: i64, index: u8, values: &[u32]) -> Self {
        for &value in values {
            self = self.allow_if(syscall, &[Arg::Eq32 { index, value }]);
        }
        self
    }

    /// Allows `ioctl` with each of `requests` (compared on the 32 bits the kernel reads).
    pub fn allow_ioctls(self, requests: &[u32]) -> Self {
        self.allow_arg_values(libc::SYS_ioctl, 1, requests)
    }

    /// Descriptors (besides stdio) the process holds when it locks down: its inherited ones
    /// and the ones it created itself during setup. Lockdown refuses (when the launcher
    /// confined the process) or warns about (otherwise) any other open descriptor.
    pub fn expect_fds(mut self, fds: impl IntoIterator<Item = RawFd>) -> Self {
        self.expected_fds.extend(fds);
        self
    }

    /// Lets the process remove files beneath `dir` (Landlock `REMOVE_FILE` there and nothing
    /// else). Meant for a binary started by hand that created a socket at a path and removes
    /// it when it exits. `dir` must exist when lockdown starts; in a process the launcher
    /// confined it is unreachable after the `pivot_root`, so the rule grants nothing there.
    pub fn allow_remove_beneath(mut self, dir: impl AsRef<Path>) -> Self {
        self.remove_beneath.push(dir.as_ref().to_owned());
        self
    }

    /// The descriptors given to [`Self::expect_fds`].
    pub fn expected_fds(&self) -> &[RawFd] {
        &self.expected_fds
    }

    /// The directories given to [`Self::allow_remove_beneath`].
    pub fn remove_beneath(&self) -> &[PathBuf] {
        &self.remove_beneath
    }

    /// How many distinct system calls the allow-list names.
    pub fn syscall_count(&self) -> usize {
        self.rules.len()
    }

    /// Whether `syscall` is on the list (with or without conditions).
    pub fn lists(&self, syscall: i64) -> bool {
        self.rules.contains_key(&syscall)
    }

    fn arch(&self) -> Result<TargetArch, PolicyError> {
        TargetArch::try_from(std::env::consts::ARCH).map_err(|source| PolicyError::Arch {
            name: self.name.clone(),
            arch: std::env::consts::ARCH,
            source,
        })
    }

    /// The allow-list as a BPF program: listed calls are allowed, anything else gets
    /// `on_violation`.
    pub fn compile(&self, on_violation: Violation) -> Result<BpfProgram, PolicyError> {
        let on_violation = match on_violation {
            Violation::Kill => SeccompAction::KillProcess,
            Violation::Log => SeccompAction::Log,
        };
        let mut rules = BTreeMap::new();
        for (&syscall, allowed) in &self.rules {
            let chain = match allowed {
                Allowed::Always => Vec::new(),
                Allowed::When(alternatives) => {
                    let mut chain = Vec::new();
                    for args in alternatives {
                        let conds = args
                            .iter()
                            .map(|a| a.condition())
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|(index, source)| PolicyError::Condition {
                                name: self.name.clone(),
                                syscall,
                                index,
                                source,
                            })?;
                        chain.push(SeccompRule::new(conds).map_err(|source| {
                            PolicyError::Rule {
                                name: self.name.clone(),
                                syscall,
                                source,
                            }
                        })?);
                    }
                    chain
                }
            };
            rules.insert(syscall, chain);
        }
        self.build(rules, on_violation, SeccompAction::Allow)
    }

    /// The filter that answers `clone3` with `ENOSYS` and allows everything else (the
    /// allow-list decides about everything else).
    pub fn compile_clone3_fallback(&self) -> Result<BpfProgram, PolicyError> {
        let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
        let enosys = u32::try_from(libc::ENOSYS).expect("ENOSYS is positive");
        self.build(rules, SeccompAction::Allow, SeccompAction::Errno(enosys))
    }

    fn build(
        &self,
        rules: BTreeMap<i64, Vec<SeccompRule>>,
        mismatch: SeccompAction,
        matched: SeccompAction,
    ) -> Result<BpfProgram, PolicyError> {
        let compile = |source| PolicyError::Compile {
            name: self.name.clone(),
            source,
        };
        let filter = SeccompFilter::new(rules, mismatch, matched, self.arch()?).map_err(compile)?;
        filter.try_into().map_err(compile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditional_rules_accumulate_and_always_wins() {
        let p = Policy::new("t")
            .allow_ioctls(&[1, 2])
            .allow_if(libc::SYS_fcntl, &[Arg::Eq32 { index: 1, value: 3 }])
            .allow(&[libc::SYS_fcntl]);
        assert_eq!(p.syscall_count(), 2);
        assert_eq!(
            p.rules[&libc::SYS_ioctl],
            Allowed::When(vec![
                vec![Arg::Eq32 { index: 1, value: 1 }],
                vec![Arg::Eq32 { index: 1, value: 2 }]
            ])
        );
        assert_eq!(p.rules[&libc::SYS_fcntl], Allowed::Always);
        let p = p.allow_if(libc::SYS_fcntl, &[Arg::Eq32 { index: 1, value: 4 }]);
        assert_eq!(p.rules[&libc::SYS_fcntl], Allowed::Always);
    }

    #[test]
    fn runtime_policy_compiles_and_lists_threads_but_not_processes() {
        let p = Policy::runtime("t");
        assert!(p.lists(libc::SYS_clone) && p.lists(libc::SYS_futex));
        for nr in [
            libc::SYS_execve,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_ptrace,
            libc::SYS_fork,
            libc::SYS_unshare,
        ] {
            assert!(!p.lists(nr), "{nr} is in the runtime policy");
        }
        let kill = p.compile(Violation::Kill).unwrap();
        let log = p.compile(Violation::Log).unwrap();
        assert_eq!(kill.len(), log.len());
        assert!(!p.compile_clone3_fallback().unwrap().is_empty());
    }

    #[test]
    fn bad_argument_index_names_the_syscall() {
        let p = Policy::new("t").allow_if(libc::SYS_ioctl, &[Arg::Eq { index: 9, value: 0 }]);
        let err = p.compile(Violation::Kill).unwrap_err();
        assert!(
            matches!(err, PolicyError::Condition { syscall, index: 9, .. } if syscall == libc::SYS_ioctl),
            "{err}"
        );
    }
}
