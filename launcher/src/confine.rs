//! How each child is confined (DESIGN.md §3): the host probe and its warnings (`--strict`
//! refuses instead), dedicated host ids, a cgroup leaf per process when a delegated cgroup
//! v2 exists, rlimits per process kind, and the per-device debug modes of
//! `--debug-device NAME=MODE`. The mechanisms themselves are `ipc::sandbox`'s.

#![forbid(unsafe_code)]

use ipc::sandbox::cgroup::CgroupLimits;
use ipc::sandbox::{
    CgroupTree, ConfinedCommand, Confinement, HostSupport, IdAllocator, Rlimits, parse_debug_device,
};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;

/// Errors of setting confinement up.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(transparent)]
    DebugSpec(#[from] ipc::sandbox::spawn::DebugSpecError),
    #[error("--debug-device {name}=...: no process {name} (the processes are {known})")]
    UnknownDevice { name: String, known: String },
    #[error("--debug-device {0}: given twice")]
    Duplicate(String),
    #[error(transparent)]
    Strict(#[from] ipc::sandbox::probe::StrictError),
    #[error("cannot allocate a dedicated uid for {name}")]
    Ids {
        name: String,
        #[source]
        source: ipc::sandbox::spawn::SpawnError,
    },
}

/// Which kind of process a child is, for its limits.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// `vmm-core` with this many vCPUs.
    Core { cpus: u32 },
    /// `dev-blk` serving an image of this size with this many queues.
    Blk { image_bytes: u64, queues: u16 },
    /// `dev-net` with this many queue pairs.
    Net { pairs: u16 },
}

/// Stderr may be a regular log file, written by every process at ever larger offsets, so
/// `RLIMIT_FSIZE` cannot be small; it bounds what a process may write past its own data.
const LOG_ALLOWANCE: u64 = 16 << 30;
/// Memory a process needs besides guest RAM (which the core's cgroup is charged for).
const PROCESS_MEMORY: u64 = 256 << 20;

impl Kind {
    fn rlimits(self) -> Rlimits {
        match self {
            Self::Core { cpus, .. } => Rlimits {
                nofile: 1024,
                // vCPUs, the control loop, vhost-user watchdogs, drainers, the console.
                nproc: 64 + 2 * u64::from(cpus),
                core: 0,
                fsize: LOG_ALLOWANCE,
            },
            Self::Blk {
                image_bytes,
                queues,
            } => Rlimits {
                nofile: 256,
                nproc: 32 + u64::from(queues),
                core: 0,
                fsize: image_bytes.saturating_add(LOG_ALLOWANCE),
            },
            Self::Net { pairs } => Rlimits {
                nofile: 256,
                nproc: 32 + 2 * u64::from(pairs),
                core: 0,
                fsize: LOG_ALLOWANCE,
            },
        }
    }

    /// `guest_ram`: the VM's RAM. Its memfd pages are charged to whichever process touches
    /// them first, and a device writing into a buffer the guest never touched is that
    /// process, so every process's limit leaves room for all of guest RAM.
    fn cgroup_limits(self, guest_ram: u64) -> CgroupLimits {
        let rl = self.rlimits();
        let memory = guest_ram.saturating_add(PROCESS_MEMORY);
        CgroupLimits {
            memory_max: Some(memory),
            pids_max: Some(rl.nproc),
            cpu_weight: Some(100),
        }
    }
}

/// The launcher's confinement state for one VM.
pub struct Confiner {
    support: HostSupport,
    ids: IdAllocator,
    cgroup: Result<CgroupTree, String>,
    debug: HashMap<String, Confinement>,
    guest_ram: u64,
}

impl Confiner {
    /// `guest_ram` sizes the processes' memory limits. Probes the host, prints a warning per missing measure (or, with `strict`, refuses),
    /// and checks every `--debug-device` value against the process names `known`.
    pub fn new(
        strict: bool,
        debug_specs: &[String],
        known: &[String],
        guest_ram: u64,
    ) -> Result<Self, ConfineError> {
        let mut debug = HashMap::new();
        for spec in debug_specs {
            let (name, mode) = parse_debug_device(spec)?;
            if !known.contains(&name) {
                return Err(ConfineError::UnknownDevice {
                    name,
                    known: known.join(", "),
                });
            }
            if debug.insert(name.clone(), mode).is_some() {
                return Err(ConfineError::Duplicate(name));
            }
        }
        let support = ipc::sandbox::probe();
        if strict {
            support.strict()?;
        }
        for warning in support.warnings() {
            eprintln!("atoll: confinement warning: {warning}");
        }
        let cgroup = ipc::sandbox::probe::cgroup_tree(&support);
        Ok(Self {
            support,
            ids: IdAllocator::for_this_launcher(),
            cgroup,
            debug,
            guest_ram,
        })
    }

    /// The command that starts process `name` confined as it should be.
    pub fn command(
        &mut self,
        name: &str,
        program: &Path,
        args: &[OsString],
        kind: Kind,
    ) -> Result<ConfinedCommand, ConfineError> {
        let mut cmd = ConfinedCommand::new(name, program);
        cmd.args(args.iter().cloned()).process_group(true);
        if name != crate::supervisor::VMM_CORE.name {
            // Its log lines then read `dev-blk disk0 (pid N): ...`.
            cmd.env(ipc::logging::DEVICE_ENV, name);
        }
        let confinement = self.debug.get(name).cloned().unwrap_or(Confinement::Full);
        cmd.confinement(confinement);
        if let Err(why) = &self.support.namespaces {
            cmd.without_namespaces(why.clone());
        }
        if self.support.root {
            let ids = self.ids.allocate().map_err(|source| ConfineError::Ids {
                name: name.to_owned(),
                source,
            })?;
            cmd.ids(ids);
        }
        cmd.rlimits(kind.rlimits());
        match &self.cgroup {
            Ok(tree) => match tree.leaf(name, kind.cgroup_limits(self.guest_ram)) {
                Ok(leaf) => {
                    cmd.cgroup(leaf);
                }
                Err(e) => {
                    cmd.no_cgroup(e.to_string());
                }
            },
            Err(why) => {
                cmd.no_cgroup(why.clone());
            }
        }
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_process() {
        let core = Kind::Core { cpus: 4 };
        assert_eq!(core.rlimits().nproc, 72);
        assert_eq!(
            core.cgroup_limits(1 << 30).memory_max,
            Some((1 << 30) + PROCESS_MEMORY)
        );
        let blk = Kind::Blk {
            image_bytes: 8 << 30,
            queues: 2,
        };
        assert_eq!(blk.rlimits().fsize, (8 << 30) + LOG_ALLOWANCE);
        assert_eq!(blk.rlimits().core, 0);
        assert_eq!(Kind::Net { pairs: 2 }.rlimits().nproc, 36);
    }

    #[test]
    fn debug_devices_must_name_a_process_once() {
        let known = vec!["vmm-core".to_owned(), "disk0".to_owned()];
        let err = |specs: &[&str]| {
            let specs: Vec<String> = specs.iter().map(|s| (*s).to_owned()).collect();
            Confiner::new(false, &specs, &known, 1 << 30)
                .err()
                .map(|e| e.to_string())
        };
        assert!(
            err(&["net7=unconfined"])
                .unwrap()
                .contains("no process net7 (the processes are vmm-core, disk0)")
        );
        assert!(
            err(&["disk0=unconfined", "disk0=seccomp-log"])
                .unwrap()
                .contains("given twice")
        );
        assert!(err(&["disk0=sideways"]).unwrap().contains("unknown mode"));
        assert!(err(&["disk0=wrap:'strace -f -o /tmp/t'"]).is_none());
    }
}
