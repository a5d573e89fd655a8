//! The initramfs images of the testbed: L1's (KVM, 9p, overlay, switch_root into the host's
//! `/`) and the L2 test guests' (busybox, chosen modules, an `/init` that prints facts).

use std::path::{Path, PathBuf};

use crate::cpio::{CpioError, CpioWriter};
use crate::elf::{self, ElfError};
use crate::kernel::Kernel;
use crate::modules::{ModuleError, ModuleIndex};

/// Stage 1 of L1's init: modules, 9p, overlay, switch_root.
pub const L1_INIT: &str = include_str!("../scripts/l1-init.sh");
/// Stage 2 of L1's init: runs the work share's `l1-script.sh` and powers off.
pub const L1_STAGE2: &str = include_str!("../scripts/l1-stage2.sh");
/// The start of every L2 `/init`: defines `fact`, `standard_facts` and `finish`.
pub const L2_PRELUDE: &str = include_str!("../scripts/l2-prelude.sh");

/// L1's modules, in load order (their dependencies come along anyway).
pub const L1_MODULES: &[&str] = &[
    // KVM with nested SVM.
    "irqbypass",
    "kvm",
    "ccp",
    "kvm-amd",
    // The host's `/` and the work directory over virtio-9p.
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "overlay",
    // Tap devices for the L2 guests' network cards.
    "tun",
];

/// The modules of the standard L2 facts guest: pvpanic through ACPI `QEMU0001`.
pub const L2_FACT_MODULES: &[&str] = &["pvpanic", "pvpanic-mmio"];

/// Errors of the initramfs builders.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error(
        "no busybox at {0} (install the busybox-static package, or point $ATOLL_TESTBED_BUSYBOX \
         at a statically linked busybox)"
    )]
    NoBusybox(PathBuf),
    #[error("{0} is dynamically linked; the guests need a static busybox (package busybox-static)")]
    DynamicBusybox(PathBuf),
    #[error("{path} is not an executable")]
    BusyboxElf {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error(transparent)]
    Module(#[from] ModuleError),
}

/// The statically linked busybox that goes into every image.
pub fn busybox_path() -> PathBuf {
    std::env::var_os("ATOLL_TESTBED_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            ["/bin/busybox", "/usr/bin/busybox"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from("/bin/busybox"))
        })
}

/// An initramfs in the making: busybox, `/dev/console`, modules, files, `/init`.
#[derive(Debug)]
pub struct InitramfsBuilder {
    cpio: CpioWriter,
}

impl InitramfsBuilder {
    /// An image with busybox at `/bin/busybox` and the device nodes the kernel needs before
    /// devtmpfs is mounted.
    pub fn new(busybox: &Path) -> Result<Self, InitramfsError> {
        let bytes =
            std::fs::read(busybox).map_err(|_| InitramfsError::NoBusybox(busybox.into()))?;
        let is_static =
            elf::is_static_executable(&bytes).map_err(|source| InitramfsError::BusyboxElf {
                path: busybox.into(),
                source,
            })?;
        if !is_static {
            return Err(InitramfsError::DynamicBusybox(busybox.into()));
        }
        let mut cpio = CpioWriter::new();
        for dir in [
            "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc",
        ] {
            cpio.dir(dir, 0o755)?;
        }
        cpio.file("bin/busybox", 0o755, &bytes)?;
        cpio.symlink("bin/sh", "busybox")?;
        cpio.char_device("dev/console", 0o600, 5, 1)?;
        cpio.char_device("dev/null", 0o666, 1, 3)?;
        Ok(Self { cpio })
    }

    /// Adds the modules and their dependencies as `/lib/modules/<name>.ko`, and their load
    /// order as `/etc/modules.load` (one name per line). Returns the load order.
    pub fn modules(
        &mut self,
        index: &ModuleIndex,
        names: &[&str],
    ) -> Result<Vec<String>, InitramfsError> {
        let modules = index.closure(names)?;
        let mut order = String::new();
        for module in &modules {
            self.cpio.file(
                &format!("lib/modules/{}.ko", module.name),
                0o644,
                &module.bytes,
            )?;
            order.push_str(&module.name);
            order.push('\n');
        }
        self.cpio
            .file("etc/modules.load", 0o644, order.as_bytes())?;
        Ok(modules.into_iter().map(|m| m.name).collect())
    }

    /// Adds a regular file (`path` relative to the image root).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), InitramfsError> {
        Ok(self.cpio.file(path, mode, data)?)
    }

    /// Adds `/init`.
    pub fn init(&mut self, script: &str) -> Result<(), InitramfsError> {
        self.file("init", 0o755, script.as_bytes())
    }

    /// The finished, uncompressed `newc` archive.
    pub fn finish(self) -> Vec<u8> {
        self.cpio.finish()
    }
}

/// L1's initramfs for `kernel`.
pub fn l1_initramfs(kernel: &Kernel) -> Result<Vec<u8>, InitramfsError> {
    let index = ModuleIndex::open(&kernel.modules_dir)?;
    let mut image = InitramfsBuilder::new(&busybox_path())?;
    image.modules(&index, L1_MODULES)?;
    image.file("etc/stage2", 0o755, L1_STAGE2.as_bytes())?;
    image.init(L1_INIT)?;
    Ok(image.finish())
}

/// An L2 initramfs for `kernel` with `modules` (plus dependencies) and the given `/init`.
/// `/init` usually is [`L2_PRELUDE`] followed by a scenario body; see [`l2_facts_init`].
pub fn l2_initramfs(
    kernel: &Kernel,
    modules: &[&str],
    init: &str,
) -> Result<Vec<u8>, InitramfsError> {
    let index = ModuleIndex::open(&kernel.modules_dir)?;
    let mut image = InitramfsBuilder::new(&busybox_path())?;
    image.modules(&index, modules)?;
    image.init(init)?;
    Ok(image.finish())
}

/// The standard L2 `/init`: prints the standard facts, then does `testbed.action=`.
pub fn l2_facts_init() -> String {
    format!("{L2_PRELUDE}\nstandard_facts\nfinish\n")
}

/// The demo guest's `/init`: a banner, the standard facts, then (with `testbed.action=shell`)
/// a busybox shell on the serial console; leaving the shell powers the VM off.
pub fn l2_demo_init() -> String {
    format!(
        "{L2_PRELUDE}
cat <<'BANNER'

    +--------------------------------------------------+
    |  atoll demo guest: Debian kernel, busybox /init  |
    |  `poweroff -f` or leaving the shell ends the VM  |
    +--------------------------------------------------+

BANNER
standard_facts
finish
"
    )
}
