//! atoll's system-test harness: the nested-KVM testbed of `TESTBED.md`.
//!
//! The build and CI machines are VMs whose `/dev/kvm` (`kvm_pvm`) cannot boot Linux. So the
//! harness boots an L1 Debian kernel under QEMU-TCG with an emulated SVM CPU; L1's own KVM
//! then runs the L2 test guests, under atoll or under Debian's QEMU as the differential
//! reference. On a host with a real KVM the same L2 boots run directly.
//!
//! ```no_run
//! use atoll_tests::{Testbed, l2::{L2Boot, Vmm}};
//! use std::time::Duration;
//! let testbed = Testbed::setup()?;
//! let work = testbed.work_dir("example")?;
//! let initramfs = testbed.facts_initramfs(&work)?;
//! let boots = [L2Boot {
//!     name: "one".into(), vmm: Vmm::Qemu, cpus: 1, memory_mib: 512,
//!     cmdline: "console=ttyS0".into(), initramfs, timeout: Duration::from_secs(120),
//! }];
//! for outcome in testbed.run_l2_boots(&work, &boots)? {
//!     println!("{}", outcome.describe());
//! }
//! # Ok::<(), atoll_tests::TestbedError>(())
//! ```

pub mod blk;
pub mod cmd;
pub mod cpio;
pub mod elf;
pub mod host;
pub mod initramfs;
pub mod io_error;
pub mod kernel;
pub mod l1;
pub mod l2;
pub mod modules;
pub mod net;
pub mod paths;
pub mod restart;
pub mod tiny;

use std::path::{Path, PathBuf};
use std::time::Duration;

use host::{HostKvm, Placement};
use initramfs::InitramfsError;
use io_error::{IoError, io};
use kernel::{Kernel, KernelError};
use l1::{L1Error, L1Options, ScriptRun};
use l2::{L2Boot, L2Outcome};

/// Errors of [`Testbed`].
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("`{tool}` is not installed (apt-get install -y {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{0}")]
    Placement(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error(transparent)]
    L1(#[from] L1Error),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("the L2 boot script failed with status {status}; its output: {log}")]
    BootScript { status: i32, log: PathBuf },
}

/// Whether `program` is on `$PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// The kernel, and where L2 guests run.
#[derive(Debug)]
pub struct Testbed {
    pub kernel: Kernel,
    pub host: HostKvm,
    pub placement: Placement,
    pub l1: L1Options,
}

impl Testbed {
    /// Checks the tools, fetches the kernel (cached under `target/testbed-cache/`) and decides
    /// where L2 guests run (see [`Placement::choose`]).
    pub fn setup() -> Result<Self, TestbedError> {
        for (tool, package) in [
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("timeout", "coreutils"),
            ("apt-get", "apt"),
            ("dpkg-deb", "dpkg"),
        ] {
            if !on_path(tool) {
                return Err(TestbedError::MissingTool { tool, package });
            }
        }
        let host = HostKvm::detect();
        let placement = Placement::choose(host).map_err(TestbedError::Placement)?;
        let cache = paths::cache_dir();
        std::fs::create_dir_all(&cache).map_err(io("creating", &cache))?;
        let kernel = Kernel::fetch(&cache)?;
        Ok(Self {
            kernel,
            host,
            placement,
            l1: L1Options::default(),
        })
    }

    /// A fresh work directory `target/testbed/<name>-<pid>`. Directories of earlier runs of
    /// the same name whose process is gone are removed.
    pub fn work_dir(&self, name: &str) -> Result<PathBuf, TestbedError> {
        let runs = paths::runs_dir();
        std::fs::create_dir_all(&runs).map_err(io("creating", &runs))?;
        let prefix = format!("{name}-");
        for entry in std::fs::read_dir(&runs)
            .map_err(io("reading", &runs))?
            .filter_map(Result::ok)
        {
            let file_name = entry.file_name();
            let Some(pid) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let old = entry.path();
                std::fs::remove_dir_all(&old).map_err(io("removing", &old))?;
            }
        }
        let work = runs.join(format!("{name}-{}", std::process::id()));
        if work.exists() {
            std::fs::remove_dir_all(&work).map_err(io("removing", &work))?;
        }
        std::fs::create_dir_all(&work).map_err(io("creating", &work))?;
        Ok(work)
    }

    /// Writes an L2 initramfs with `modules` and `init` to `path`.
    pub fn write_l2_initramfs(
        &self,
        path: &Path,
        modules: &[&str],
        init: &str,
    ) -> Result<(), TestbedError> {
        let image = initramfs::l2_initramfs(&self.kernel, modules, init)?;
        Ok(std::fs::write(path, image).map_err(io("writing", path))?)
    }

    /// Writes the standard facts initramfs ([`initramfs::l2_facts_init`] with the pvpanic
    /// modules) to `<work>/l2-facts.cpio` and returns its path.
    pub fn facts_initramfs(&self, work: &Path) -> Result<PathBuf, TestbedError> {
        let path = work.join("l2-facts.cpio");
        self.write_l2_initramfs(
            &path,
            initramfs::L2_FACT_MODULES,
            &initramfs::l2_facts_init(),
        )?;
        Ok(path)
    }

    /// Runs a shell script where L2 guests can run: inside L1, or directly on a host with a
    /// real KVM. See [`l1::run`] for the script's environment.
    pub fn run_script(
        &self,
        work: &Path,
        script: &str,
        timeout: Duration,
        interactive: bool,
    ) -> Result<ScriptRun, TestbedError> {
        Ok(match self.placement {
            Placement::L1 => {
                let options = L1Options {
                    timeout,
                    ..self.l1.clone()
                };
                l1::run(&self.kernel, work, script, &options, interactive)?
            }
            Placement::Direct => l1::run_direct(work, script, timeout)?,
        })
    }

    /// Runs `boots` one after another in one L1 session (or directly) and returns their
    /// outcomes in the same order. Logs are in `<work>/l2/`.
    pub fn run_l2_boots(
        &self,
        work: &Path,
        boots: &[L2Boot],
    ) -> Result<Vec<L2Outcome>, TestbedError> {
        let out = work.join("l2");
        let script = l2::boots_script(boots, &self.kernel, &paths::release_bin("atoll"), &out);
        // Boot L1 and power it off, plus each boot's own limit.
        let timeout = boots
            .iter()
            .map(|b| b.timeout + Duration::from_secs(15))
            .sum::<Duration>()
            + Duration::from_secs(120);
        let run = self.run_script(work, &script, timeout, false)?;
        if run.status != 0 {
            return Err(TestbedError::BootScript {
                status: run.status,
                log: work.join(l1::SCRIPT_LOG),
            });
        }
        Ok(boots.iter().map(|b| L2Outcome::read(b, &out)).collect())
    }
}
