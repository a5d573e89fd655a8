//! Confinement of atoll's child processes (DESIGN.md §3).
//!
//! Confinement happens in two halves:
//!
//! 1. **Launcher side** ([`spawn`]): [`spawn::ConfinedCommand`] starts a child with `clone3`
//!    into new user, pid, mount, network, ipc, uts and cgroup namespaces (and into its cgroup
//!    leaf, [`cgroup`]), maps the namespace's uid/gid 0 to a dedicated host uid/gid, sets
//!    `no_new_privs` and the rlimits, places exactly the listed descriptors and `exec`s the
//!    binary. The launcher keeps a pidfd per child to wait for and signal it.
//! 2. **Process side** ([`lockdown::lockdown`]): each binary, once it has taken its inherited
//!    descriptors and done what needs the filesystem, `pivot_root`s into an empty read-only
//!    tmpfs, restricts itself with Landlock (no filesystem access), drops every capability,
//!    checks its open descriptors and installs its own seccomp allow-list ([`policy`]) on all
//!    threads. From then on, an unlisted system call kills the process (`SIGSYS`).
//!
//! [`probe()`] tells what the host supports (and what `atoll` must warn about, or refuse under
//! `--strict`); [`report`] holds the one-line-per-process confinement report.
//!
//! # Environment variables
//!
//! - [`CONFINE_ENV`] (`ATOLL_CONFINE`): set by the launcher in every child's environment; it
//!   tells [`lockdown::lockdown`] what the launcher did and what is left to do:
//!   - `full`: the launcher created the namespaces and the uid map; lockdown pivots into the
//!     empty root and installs seccomp with kill-process on violation;
//!   - `seccomp-log`: the same, but a violation is logged (kernel audit log, `SECCOMP_RET_LOG`)
//!     and the call is allowed: `atoll run --debug-device NAME=seccomp-log`;
//!   - `wrapped`: the device runs under a wrapper (`strace`, `gdbserver`) that needs the host
//!     filesystem and perhaps the network, so the launcher created no namespaces and changed
//!     no ids; lockdown skips the `pivot_root` but still applies Landlock, drops capabilities,
//!     sets `no_new_privs` and installs seccomp in LOG mode (a tracer or debugger may make the
//!     tracee issue calls outside its list; a kill would end the debugging session);
//!   - `none`: `--debug-device NAME=unconfined`: lockdown changes nothing and only reports;
//!   - unset: the binary was started by hand (for example `dev-blk --socket PATH`): it is in
//!     no namespace of its own, so lockdown skips the `pivot_root` and applies the rest, with
//!     kill-process on violation.
//! - [`REPORT_FD_ENV`] (`ATOLL_CONFINE_REPORT_FD`): the descriptor number on which the child
//!   writes its [`report::ProcessReport`] (postcard) once locked down, then closes it. The
//!   launcher reads it with [`spawn::ConfinedChild::read_report`].
//! - `ATOLL_SELFTEST` (only in binaries built with the `confinement-selftest` feature): after
//!   lockdown, attempt one escape (`open`, `socket`, `exec` or `ptrace`), print the result and
//!   exit; see the `selftest` module (built with that feature only).

//! # What the launcher does per child
//!
//! Once at start: `let support = probe();` print each of `support.warnings()` (or, with
//! `--strict`, fail with `support.strict()`); if `support.cgroup` is `Ok`, create the subtree
//! with [`probe::cgroup_tree`] and keep the [`cgroup::CgroupTree`] until every child has been
//! reaped (dropping it removes the cgroups); keep one [`spawn::IdAllocator`].
//!
//! Per child (and reused for each restart of that child):
//! 1. a [`ConfinedCommand`] with the binary, its arguments, `.ids(allocator.allocate()?)`,
//!    `.rlimits(..)`, `.cgroup(tree.leaf(name, limits)?)` (or `.no_cgroup(reason)`),
//!    `.process_group(true)`, and `.confinement(..)` from `--debug-device`
//!    ([`spawn::parse_debug_device`]); `.without_namespaces(reason)` when
//!    `support.namespaces` is an error and `--strict` is off;
//! 2. `spawn(&fds)` from a long-lived thread, with stdin replaced by `/dev/null` (target 0);
//! 3. `read_report(timeout)` and print the [`ConfinementReport`] (one line; `shortfalls()`
//!    lists what it lacks);
//! 4. supervise through the pidfd ([`ConfinedChild::pidfd`] becomes readable on exit, then
//!    `try_wait`); stop with `signal`/`kill`. A confined child is pid 1 of its namespace: it
//!    does not get `SIGTERM` unless it blocks or handles it (dev-blk does; the core is stopped
//!    over its control socket), `SIGKILL` always works.

pub mod cgroup;
pub mod lockdown;
pub mod policy;
pub mod probe;
pub mod report;
#[cfg(feature = "confinement-selftest")]
pub mod selftest;
pub mod spawn;

pub use cgroup::{CgroupLimits, CgroupTree};
pub use lockdown::{LockdownError, lockdown};
pub use policy::Policy;
pub use probe::{HostSupport, probe};
pub use report::{ConfinementReport, ProcessReport, Rlimits};
pub use spawn::{
    ConfinedChild, ConfinedCommand, Confinement, HostIds, IdAllocator, parse_debug_device,
};

use serde::{Deserialize, Serialize};

/// The environment variable that carries the [`Mode`] from the launcher to the child.
pub const CONFINE_ENV: &str = "ATOLL_CONFINE";
/// The environment variable naming the descriptor the child writes its report to.
pub const REPORT_FD_ENV: &str = "ATOLL_CONFINE_REPORT_FD";

/// How a process is confined, as the process itself sees it (from [`CONFINE_ENV`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Namespaces made by the launcher; empty root; seccomp kills on violation.
    Full,
    /// Namespaces made by the launcher; empty root; seccomp logs violations.
    SeccompLog,
    /// Under a debugging wrapper: no namespaces; seccomp logs violations.
    Wrapped,
    /// Debugging: nothing applied.
    Unconfined,
    /// Started by hand, outside atoll: no namespaces; seccomp kills on violation.
    Standalone,
}

/// An [`CONFINE_ENV`] value that names no mode.
#[derive(Debug, thiserror::Error)]
#[error(
    "{CONFINE_ENV}={0:?} is not a confinement mode (full, seccomp-log, wrapped, none, or unset)"
)]
pub struct UnknownMode(pub String);

impl Mode {
    /// The value of [`CONFINE_ENV`] that selects this mode (`None`: unset).
    pub fn env_value(self) -> Option<&'static str> {
        match self {
            Self::Full => Some("full"),
            Self::SeccompLog => Some("seccomp-log"),
            Self::Wrapped => Some("wrapped"),
            Self::Unconfined => Some("none"),
            Self::Standalone => None,
        }
    }

    /// Parses a [`CONFINE_ENV`] value (`None`: the variable is unset).
    pub fn from_env_value(value: Option<&str>) -> Result<Self, UnknownMode> {
        match value {
            None => Ok(Self::Standalone),
            Some("full") => Ok(Self::Full),
            Some("seccomp-log") => Ok(Self::SeccompLog),
            Some("wrapped") => Ok(Self::Wrapped),
            Some("none") => Ok(Self::Unconfined),
            Some(other) => Err(UnknownMode(other.to_owned())),
        }
    }

    /// The mode of this process, from its environment.
    pub fn from_env() -> Result<Self, UnknownMode> {
        let value = std::env::var_os(CONFINE_ENV);
        let text = value.as_ref().map(|v| v.to_string_lossy());
        Self::from_env_value(text.as_deref())
    }

    /// Whether the launcher created the namespaces (so lockdown must `pivot_root`).
    pub fn has_namespaces(self) -> bool {
        matches!(self, Self::Full | Self::SeccompLog)
    }

    /// Whether seccomp violations are only logged.
    pub fn seccomp_logs(self) -> bool {
        matches!(self, Self::SeccompLog | Self::Wrapped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_round_trips_through_its_env_value() {
        for mode in [
            Mode::Full,
            Mode::SeccompLog,
            Mode::Wrapped,
            Mode::Unconfined,
            Mode::Standalone,
        ] {
            assert_eq!(Mode::from_env_value(mode.env_value()).unwrap(), mode);
        }
        let err = Mode::from_env_value(Some("strict")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ATOLL_CONFINE=\"strict\" is not a confinement mode (full, seccomp-log, wrapped, \
             none, or unset)"
        );
    }
}
