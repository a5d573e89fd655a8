//! The command line of `atoll`, as clap sees it.
//!
//! Every value is taken as text here and validated in [`crate::config`], so that each bad value
//! gets one line naming the option and the value, in one format.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Text shown after the option list of `atoll --help` and `atoll run --help`.
const AFTER_HELP: &str = "\
Environment:
  ATOLL_LOG           Log filter for all atoll processes (tracing EnvFilter syntax, default \"warn\"),
                      e.g. ATOLL_LOG=info or ATOLL_LOG=atoll=debug
  ATOLL_CORE_BIN      Path of the vmm-core binary (default: vmm-core next to the atoll binary)
  ATOLL_DEV_BLK_BIN   Path of the dev-blk binary (default: dev-blk next to the atoll binary)
  ATOLL_DEV_NET_BIN   Path of the dev-net binary (default: dev-net next to the atoll binary)
  ATOLL_KVM_DEVICE    Path of the KVM device (default: /dev/kvm)
  XDG_RUNTIME_DIR     Where the private runtime directory for device sockets is created
                      (default: /tmp)

Exit status of `atoll run`:
  0    the guest powered off
  1    internal error (vmm-core failed or died)
  2    bad command line or bad input file
  3    the guest rebooted
  4    the guest crashed (triple fault or KVM internal error)
  130  stopped by SIGINT, SIGTERM, SIGHUP or Ctrl-A x";

/// atoll: a KVM virtual machine monitor split into least-privilege processes.
///
/// `atoll run` boots a Linux kernel in a VM whose serial console is connected to this
/// terminal. The vCPUs and guest RAM live in a `vmm-core` process, each block device in its
/// own `dev-blk` process, each network card in its own `dev-net` process; atoll opens every
/// file and tap they need and passes them descriptors.
#[derive(Debug, Parser)]
#[command(name = "atoll", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `atoll`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and connect its serial console to stdin/stdout.
    ///
    /// The console is the guest's ttyS0. When stdin is a terminal it is put in raw mode for
    /// the VM's lifetime (keys such as Ctrl-C go to the guest); type Ctrl-A x to stop the VM
    /// and Ctrl-A Ctrl-A to send a literal Ctrl-A. When stdin reaches end of file the VM keeps
    /// running. atoll exits when the guest powers off, reboots or crashes.
    #[command(after_help = AFTER_HELP)]
    Run(RunArgs),
}

/// Options of `atoll run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Linux kernel to boot: a bzImage (boot protocol 2.06 or later) or an uncompressed
    /// x86-64 ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial RAM filesystem (a non-empty, readable file, usually a cpio archive) handed to
    /// the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line. It replaces the default, so include console=ttyS0 to see the
    /// kernel's output.
    #[arg(long, value_name = "STR", default_value = crate::config::DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Number of vCPUs: 1 up to what KVM allows on this host, at most 255.
    #[arg(long, value_name = "N", default_value = "1")]
    pub cpus: String,

    /// Guest RAM: bytes, or a number with a K, M, G or T suffix (also KiB, MiB, GiB, TiB; all
    /// powers of 1024), e.g. 512M or 2G. At least 64M, a multiple of 4K, and no more than the
    /// host's total memory.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    pub memory: String,

    /// Add a virtio-blk disk; repeatable.
    ///
    /// The guest sees the disks as vda, vdb, ... in the order given. A disk is either an
    /// image served by its own dev-blk process (path=IMG...) or an externally managed
    /// vhost-user-blk backend, such as qemu-storage-daemon's vhost-user-blk export, that atoll
    /// connects to and does not start (socket=PATH...). Keys:
    ///   path=IMG         raw image file or block device (cannot contain a comma)
    ///   readonly=on|off  open the image read-only; the guest sees a read-only disk
    ///   direct=on|off    open the image with O_DIRECT, bypassing the host page cache
    ///   serial=ID        the disk's serial number, 1 to 20 printable ASCII characters
    ///   socket=PATH      the UNIX socket an external vhost-user-blk backend listens on
    ///                    (cannot contain a comma); combines with queues= only: the backend
    ///                    itself decides read-only, caching and serial
    ///   queues=N         request queues offered to the guest, 1 to 64 (default 1; an external
    ///                    backend may offer fewer)
    #[arg(
        long,
        verbatim_doc_comment,
        value_name = "path=IMG[,readonly=on][,direct=on][,queues=N][,serial=ID]|socket=PATH[,queues=N]"
    )]
    pub disk: Vec<String>,

    /// Add a virtio-net card on a tap device; repeatable.
    ///
    /// Each card is served by its own dev-net process. The guest sees the cards as eth0,
    /// eth1, ... (PCI order, after the disks). Keys:
    ///   tap=NAME     tap interface to use; atoll opens it (one queue per pair, with
    ///                IFF_VNET_HDR), or creates it and sets it up when it does not exist and
    ///                atoll has CAP_NET_ADMIN. A multi-queue card needs a tap created with
    ///                `ip tuntap add NAME mode tap multi_queue`.
    ///   fd=N         an open tap descriptor atoll inherited from a management layer (opened
    ///                with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR); one queue pair
    ///   mac=MAC      the card's MAC address (default: a stable locally administered
    ///                address derived from the card's index and tap)
    ///   queues=N     receive/transmit queue pairs, 1 to 16 (default 1)
    #[arg(
        long,
        verbatim_doc_comment,
        value_name = "tap=NAME[,mac=MAC][,queues=N]|fd=N[,mac=MAC]"
    )]
    pub net: Vec<String>,

    /// Refuse to start when the host lacks any confinement measure (user namespaces,
    /// Landlock, seccomp, a delegated cgroup v2 with memory and pids controllers) instead of
    /// warning about it.
    #[arg(long)]
    pub strict: bool,

    /// Debug one process while the others stay confined; repeatable. NAME is vmm-core or a
    /// device (disk0, net0, ...; numbered in command-line order). MODE:
    ///   seccomp-log   log seccomp violations (kernel audit log) instead of killing
    ///   unconfined    start it with no confinement at all
    ///   wrap:'CMD'    start it under CMD, e.g. wrap:'strace -f -o /tmp/t' or
    ///                 wrap:'gdbserver :1234'; the wrapper runs outside the namespaces,
    ///                 the device still drops privileges with seccomp in log mode
    /// Its log lines carry its name and pid like every other process's.
    #[arg(long, value_name = "NAME=MODE", verbatim_doc_comment)]
    pub debug_device: Vec<String>,
}
