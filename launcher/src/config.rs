//! From the command line to a validated VM configuration with every file already open.
//!
//! Validation opens what it checks (kernel, initramfs, disk images, the KVM device) and keeps
//! the open files, so that what the VM gets is exactly what was checked. Each error is one
//! line naming the offending option and its value.

#![forbid(unsafe_code)]

use crate::cli::RunArgs;
use kvm_ioctls::Kvm;
use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The kernel command line used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// The smallest guest RAM atoll accepts (a Debian kernel with an initramfs needs about this).
pub const MIN_MEMORY: u64 = 64 << 20;
/// Guest RAM must be a whole number of pages of this size.
pub const PAGE_SIZE: u64 = 4 << 10;
/// The most vCPUs atoll supports: xAPIC ids are 8 bits and 0xff is the broadcast id.
pub const MAX_CPUS: u32 = 255;
/// The most request queues one disk may have.
pub const MAX_DISK_QUEUES: u16 = 64;
/// The longest disk serial (virtio-blk's `VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL_LEN: usize = 20;
/// The default KVM device.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";
/// Command-line limit for kernels that do not state one (ELF vmlinux): Linux's x86
/// `COMMAND_LINE_SIZE` minus the terminating NUL.
pub const DEFAULT_CMDLINE_LIMIT: usize = 2047;

/// Errors in the configuration; each message is the whole one-line report.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--memory {value}: {reason}")]
    Memory { value: String, reason: MemoryError },
    #[error("--cpus {value}: {reason}")]
    Cpus { value: String, reason: CpusError },
    #[error("--kernel {}: {reason}", path.display())]
    Kernel { path: PathBuf, reason: KernelError },
    #[error("--initramfs {}: {reason}", path.display())]
    Initramfs { path: PathBuf, reason: FileError },
    #[error("--cmdline ({len} bytes): longer than the {limit} bytes this kernel accepts")]
    CmdlineTooLong { len: usize, limit: usize },
    #[error("--disk {value}: {reason}")]
    DiskSpec {
        value: String,
        reason: DiskSpecError,
    },
    #[error("--disk {value}: {reason}")]
    DiskImage { value: String, reason: FileError },
    #[error("--disk {value}: {reason}")]
    DiskSocket { value: String, reason: SocketError },
    #[error("--net {value}: {reason}")]
    NetSpec {
        value: String,
        reason: crate::net::NetSpecError,
    },
    #[error("--net {value}: {reason}")]
    Nic {
        value: String,
        reason: crate::net::NicError,
    },
    #[error("{}: {reason}", path.display())]
    Kvm { path: PathBuf, reason: KvmError },
    #[error("cannot read the host's memory size from /proc/meminfo: {0}")]
    HostMemory(String),
}

/// Why a size does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("empty size (expected e.g. 512M or 2G)")]
    Empty,
    #[error("not a size (expected bytes or a number with a K, M, G or T suffix, e.g. 512M or 2G)")]
    NotANumber,
    #[error("unknown suffix '{0}' (use K, M, G or T, or KiB, MiB, GiB, TiB)")]
    BadSuffix(String),
    #[error("too large")]
    Overflow,
}

/// Why a guest RAM size is not acceptable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("{} is less than the minimum of 64 MiB", Bytes(*.0))]
    TooSmall(u64),
    #[error("{0} bytes is not a multiple of 4 KiB")]
    NotPageMultiple(u64),
    #[error("{} exceeds the host's total memory of {}", Bytes(*bytes), Bytes(*host))]
    ExceedsHost { bytes: u64, host: u64 },
}

/// Why a vCPU count is not acceptable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CpusError {
    #[error("not a number")]
    NotANumber,
    #[error("at least 1 vCPU is needed")]
    Zero,
    #[error("more than the {MAX_CPUS} vCPUs atoll supports")]
    AboveAtollLimit,
    #[error("more than the {0} vCPUs KVM allows on this host")]
    AboveKvmLimit(usize),
}

/// Why a `--disk` value does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiskSpecError {
    #[error("path=IMG or socket=PATH is required")]
    MissingPath,
    #[error("empty item (stray comma)")]
    EmptyItem,
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    #[error("unknown option '{0}' (expected path, readonly, direct, queues, serial or socket)")]
    UnknownKey(String),
    #[error("'{0}' is given twice")]
    Duplicate(String),
    #[error("path= is empty")]
    EmptyPath,
    #[error("socket= is empty")]
    EmptySocket,
    #[error(
        "socket= cannot be combined with {0}= (an external backend is configured on its own \
         side; only queues= applies)"
    )]
    SocketConflict(&'static str),
    #[error("{key}={value}: expected on or off")]
    BadSwitch { key: String, value: String },
    #[error("queues={0}: expected a number from 1 to {MAX_DISK_QUEUES}")]
    BadQueues(String),
    #[error("serial={0}: expected 1 to {MAX_SERIAL_LEN} printable ASCII characters")]
    BadSerial(String),
}

/// Why a file given on the command line cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot open{mode}: {}", Errno(source))]
    Open {
        path: PathBuf,
        mode: &'static str,
        source: io::Error,
    },
    #[error("cannot read: {}", Errno(source))]
    Read { path: PathBuf, source: io::Error },
    #[error("not a regular file")]
    NotAFile { path: PathBuf },
    #[error("not a regular file or block device")]
    NotAnImage { path: PathBuf },
    #[error("the file is empty")]
    Empty { path: PathBuf },
    #[error("the file system does not support direct=on (O_DIRECT)")]
    DirectUnsupported { path: PathBuf },
}

/// Why an external vhost-user backend cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("not a UNIX socket")]
    NotASocket { path: PathBuf },
    #[error(
        "cannot connect: {} (is a vhost-user-blk backend listening there?)",
        Errno(source)
    )]
    NoListener { path: PathBuf, source: io::Error },
    #[error("cannot connect: {}", Errno(source))]
    Connect { path: PathBuf, source: io::Error },
}

/// Why a kernel image cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("not a Linux kernel (bzImage or ELF vmlinux)")]
    NotAKernel,
    #[error("bzImage boot protocol {}.{:02} is too old (2.06 or later is needed)", .0 >> 8, .0 & 0xff)]
    OldBootProtocol(u16),
}

/// Why the KVM device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error(
        "not found; KVM is unavailable: load the kvm_intel or kvm_amd module and enable \
         virtualization in the firmware (or set ATOLL_KVM_DEVICE)"
    )]
    NotFound,
    #[error(
        "permission denied; add your user to the group owning it (usually 'kvm') and log in again"
    )]
    PermissionDenied,
    #[error("cannot open: {}", Errno(.0))]
    Open(io::Error),
    #[error("not a KVM device")]
    NotKvm,
    #[error("KVM API version {0} is not supported (12 is needed)")]
    ApiVersion(i32),
}

/// Formats an I/O error as its plain description ("No such file or directory").
struct Errno<'a>(&'a io::Error);

impl fmt::Display for Errno<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.raw_os_error() {
            Some(code) => f.write_str(nix::errno::Errno::from_raw(code).desc()),
            None => write!(f, "{}", self.0),
        }
    }
}

/// Formats a byte count in the largest binary unit that divides it, or in whole MiB (rounded
/// down) when no unit from MiB up divides it.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 3] = [("TiB", 40), ("GiB", 30), ("MiB", 20)];
        let n = self.0;
        for (name, shift) in UNITS {
            if n >= 1 << shift && n.trailing_zeros() >= shift {
                return write!(f, "{} {name}", n >> shift);
            }
        }
        if n >= 1 << 20 {
            write!(f, "{} MiB", n >> 20)
        } else if n >= 1 << 10 && n.trailing_zeros() >= 10 {
            write!(f, "{} KiB", n >> 10)
        } else {
            write!(f, "{n} bytes")
        }
    }
}

/// Parses a size: plain bytes or a number with a binary suffix (K, M, G, T, optionally followed
/// by `iB` or `B`; case-insensitive).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::NotANumber);
    }
    let number: u64 = digits.parse().map_err(|_| SizeError::Overflow)?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ if suffix.starts_with(|c: char| c.is_ascii_alphabetic()) => {
            return Err(SizeError::BadSuffix(suffix.to_owned()));
        }
        _ => return Err(SizeError::NotANumber),
    };
    number.checked_mul(1u64 << shift).ok_or(SizeError::Overflow)
}

/// Parses and checks a guest RAM size against atoll's rules and the host's memory.
pub fn parse_memory(text: &str, host_total: u64) -> Result<u64, MemoryError> {
    let bytes = parse_size(text)?;
    if bytes < MIN_MEMORY {
        return Err(MemoryError::TooSmall(bytes));
    }
    if bytes % PAGE_SIZE != 0 {
        return Err(MemoryError::NotPageMultiple(bytes));
    }
    if bytes > host_total {
        return Err(MemoryError::ExceedsHost {
            bytes,
            host: host_total,
        });
    }
    Ok(bytes)
}

/// Parses a vCPU count and checks it against atoll's limit (KVM's is checked later).
pub fn parse_cpus(text: &str) -> Result<u32, CpusError> {
    let cpus: u32 = text.trim().parse().map_err(|_| CpusError::NotANumber)?;
    match cpus {
        0 => Err(CpusError::Zero),
        n if n > MAX_CPUS => Err(CpusError::AboveAtollLimit),
        n => Ok(n),
    }
}

/// Reads `MemTotal` (in bytes) from the text of `/proc/meminfo`.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

/// One `--disk` value, parsed: an image atoll serves with its own `dev-blk`, or an external
/// backend atoll only connects to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSpec {
    /// `path=IMG[,readonly=on][,direct=on][,queues=N][,serial=ID]`.
    Image(ImageSpec),
    /// `socket=PATH[,queues=N]`.
    Socket(SocketSpec),
}

/// A disk image served by a `dev-blk` process atoll starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    /// The image file or block device.
    pub path: PathBuf,
    /// Open the image read-only and show the guest a read-only disk.
    pub readonly: bool,
    /// Open the image with `O_DIRECT`.
    pub direct: bool,
    /// Request queues offered to the guest.
    pub queues: u16,
    /// The disk's serial number.
    pub serial: Option<String>,
}

/// An externally managed vhost-user-blk backend (for example qemu-storage-daemon's
/// `vhost-user-blk` export) listening on a UNIX socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketSpec {
    /// The backend's listening socket.
    pub path: PathBuf,
    /// Request queues offered to the guest (at most what the backend reports).
    pub queues: u16,
}

impl DiskSpec {
    /// Parses `path=IMG[,readonly=on][,direct=on][,queues=N][,serial=ID]` or
    /// `socket=PATH[,queues=N]`.
    pub fn parse(text: &str) -> Result<Self, DiskSpecError> {
        let mut socket = None;
        let mut path = None;
        let mut readonly = None;
        let mut direct = None;
        let mut queues = None;
        let mut serial = None;
        for item in text.split(',') {
            if item.is_empty() {
                return Err(DiskSpecError::EmptyItem);
            }
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| DiskSpecError::NotKeyValue(item.to_owned()))?;
            let duplicate = match key {
                "path" => {
                    if value.is_empty() {
                        return Err(DiskSpecError::EmptyPath);
                    }
                    path.replace(PathBuf::from(value)).is_some()
                }
                "socket" => {
                    if value.is_empty() {
                        return Err(DiskSpecError::EmptySocket);
                    }
                    socket.replace(PathBuf::from(value)).is_some()
                }
                "readonly" => readonly.replace(parse_switch(key, value)?).is_some(),
                "direct" => direct.replace(parse_switch(key, value)?).is_some(),
                "queues" => {
                    let n = value
                        .parse::<u16>()
                        .ok()
                        .filter(|n| (1..=MAX_DISK_QUEUES).contains(n))
                        .ok_or_else(|| DiskSpecError::BadQueues(value.to_owned()))?;
                    queues.replace(n).is_some()
                }
                "serial" => {
                    let ok = !value.is_empty()
                        && value.len() <= MAX_SERIAL_LEN
                        && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
                    if !ok {
                        return Err(DiskSpecError::BadSerial(value.to_owned()));
                    }
                    serial.replace(value.to_owned()).is_some()
                }
                _ => return Err(DiskSpecError::UnknownKey(key.to_owned())),
            };
            if duplicate {
                return Err(DiskSpecError::Duplicate(key.to_owned()));
            }
        }
        let queues = queues.unwrap_or(1);
        if let Some(socket) = socket {
            let conflict = [
                ("path", path.is_some()),
                ("readonly", readonly.is_some()),
                ("direct", direct.is_some()),
                ("serial", serial.is_some()),
            ]
            .into_iter()
            .find_map(|(key, given)| given.then_some(key));
            if let Some(key) = conflict {
                return Err(DiskSpecError::SocketConflict(key));
            }
            return Ok(Self::Socket(SocketSpec {
                path: socket,
                queues,
            }));
        }
        Ok(Self::Image(ImageSpec {
            path: path.ok_or(DiskSpecError::MissingPath)?,
            readonly: readonly.unwrap_or(false),
            direct: direct.unwrap_or(false),
            queues,
            serial,
        }))
    }
}

fn parse_switch(key: &str, value: &str) -> Result<bool, DiskSpecError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(DiskSpecError::BadSwitch {
            key: key.to_owned(),
            value: value.to_owned(),
        }),
    }
}

/// The kind of a kernel image, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// A bzImage with its boot protocol version and command-line limit (bytes, without NUL).
    BzImage { protocol: u16, cmdline_size: u32 },
    /// An x86-64 ELF executable (vmlinux).
    Elf,
}

/// Bytes of the kernel's start [`KernelKind::detect`] looks at.
pub const KERNEL_HEADER_LEN: usize = 0x240;

impl KernelKind {
    /// Recognises a bzImage (boot-sector signature 0xAA55 at 510, "HdrS" at 0x202, boot
    /// protocol 2.06 or later) or an ELF64 little-endian x86-64 executable from the first
    /// [`KERNEL_HEADER_LEN`] bytes of a file (fewer if the file is shorter).
    pub fn detect(header: &[u8]) -> Result<Self, KernelError> {
        let u16_at = |off: usize| {
            header
                .get(off..off + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        if header.starts_with(b"\x7fELF") {
            const ELFCLASS64: u8 = 2;
            const ELFDATA2LSB: u8 = 1;
            const ET_EXEC: u16 = 2;
            const EM_X86_64: u16 = 62;
            let ok = header.get(4) == Some(&ELFCLASS64)
                && header.get(5) == Some(&ELFDATA2LSB)
                && u16_at(16) == Some(ET_EXEC)
                && u16_at(18) == Some(EM_X86_64);
            return if ok {
                Ok(Self::Elf)
            } else {
                Err(KernelError::NotAKernel)
            };
        }
        if u16_at(510) != Some(0xaa55) || header.get(0x202..0x206) != Some(b"HdrS") {
            return Err(KernelError::NotAKernel);
        }
        let protocol = u16_at(0x206).ok_or(KernelError::NotAKernel)?;
        if protocol < 0x206 {
            return Err(KernelError::OldBootProtocol(protocol));
        }
        let cmdline_size = header
            .get(0x238..0x23c)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(KernelError::NotAKernel)?;
        Ok(Self::BzImage {
            protocol,
            cmdline_size,
        })
    }

    /// The longest command line (without NUL) this kernel accepts.
    pub fn cmdline_limit(self) -> usize {
        match self {
            Self::BzImage { cmdline_size, .. } => {
                usize::try_from(cmdline_size).unwrap_or(usize::MAX)
            }
            Self::Elf => DEFAULT_CMDLINE_LIMIT,
        }
    }
}

/// Facts about the host the configuration is checked against.
#[derive(Clone, Debug)]
pub struct Host {
    /// Path of the KVM device.
    pub kvm_device: PathBuf,
    /// Total host memory in bytes.
    pub mem_total: u64,
}

impl Host {
    /// Reads the host's memory size and takes the KVM device from `ATOLL_KVM_DEVICE`.
    pub fn detect() -> Result<Self, ConfigError> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| ConfigError::HostMemory(Errno(&e).to_string()))?;
        let mem_total = parse_mem_total(&meminfo)
            .ok_or_else(|| ConfigError::HostMemory("no MemTotal line".into()))?;
        let kvm_device = std::env::var_os("ATOLL_KVM_DEVICE")
            .map_or_else(|| PathBuf::from(DEFAULT_KVM_DEVICE), PathBuf::from);
        Ok(Self {
            kvm_device,
            mem_total,
        })
    }
}

/// A validated block device: its image or its backend's connection already open.
#[derive(Debug)]
pub enum Disk {
    /// Served by a `dev-blk` process atoll starts.
    Image(ImageDisk),
    /// Served by an external backend.
    Socket(SocketDisk),
}

impl Disk {
    /// Name used in logs (and for the socket of an image disk), `disk<N>`.
    pub fn id(&self) -> &str {
        match self {
            Self::Image(disk) => &disk.id,
            Self::Socket(disk) => &disk.id,
        }
    }

    /// Request queues offered to the guest.
    pub fn queues(&self) -> u16 {
        match self {
            Self::Image(disk) => disk.spec.queues,
            Self::Socket(disk) => disk.spec.queues,
        }
    }
}

/// A disk image, open, for a `dev-blk` process.
#[derive(Debug)]
pub struct ImageDisk {
    /// `disk<N>`.
    pub id: String,
    /// What the user asked for.
    pub spec: ImageSpec,
    /// The image, opened read-only or read-write (and with `O_DIRECT`) as `spec` says.
    pub image: File,
}

/// A connection to an external vhost-user-blk backend, handed to the core as it is.
#[derive(Debug)]
pub struct SocketDisk {
    /// `disk<N>`.
    pub id: String,
    /// What the user asked for.
    pub spec: SocketSpec,
    /// Connected to `spec.path`; the backend has not seen a message yet.
    pub stream: UnixStream,
}

/// A validated `atoll run` configuration.
#[derive(Debug)]
pub struct RunConfig {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub cmdline: String,
    pub kernel_path: PathBuf,
    pub kernel_kind: KernelKind,
    /// The kernel, open read-only and positioned at its start.
    pub kernel: File,
    /// The initramfs, open read-only.
    pub initramfs: Option<File>,
    pub disks: Vec<Disk>,
    /// Network cards, their taps open.
    pub nets: Vec<crate::net::Nic>,
    /// The KVM device, open read-write.
    pub kvm: File,
}

impl RunConfig {
    /// Validates `args` against `host`, opening every file the VM needs.
    pub fn from_args(args: &RunArgs, host: &Host) -> Result<Self, ConfigError> {
        // Syntax first, so that typos are reported before anything is opened.
        let memory_bytes =
            parse_memory(&args.memory, host.mem_total).map_err(|reason| ConfigError::Memory {
                value: args.memory.clone(),
                reason,
            })?;
        let cpus = parse_cpus(&args.cpus).map_err(|reason| ConfigError::Cpus {
            value: args.cpus.clone(),
            reason,
        })?;
        let disk_specs = args
            .disk
            .iter()
            .map(|value| {
                DiskSpec::parse(value).map_err(|reason| ConfigError::DiskSpec {
                    value: value.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let net_specs = args
            .net
            .iter()
            .map(|value| {
                crate::net::NetSpec::parse(value).map_err(|reason| ConfigError::NetSpec {
                    value: value.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let (kernel, kernel_kind) =
            open_kernel(&args.kernel).map_err(|reason| ConfigError::Kernel {
                path: args.kernel.clone(),
                reason,
            })?;
        let limit = kernel_kind.cmdline_limit();
        if args.cmdline.len() > limit {
            return Err(ConfigError::CmdlineTooLong {
                len: args.cmdline.len(),
                limit,
            });
        }
        let initramfs = args
            .initramfs
            .as_deref()
            .map(|path| {
                open_initramfs(path).map_err(|reason| ConfigError::Initramfs {
                    path: path.to_owned(),
                    reason,
                })
            })
            .transpose()?;
        let disks = disk_specs
            .into_iter()
            .zip(&args.disk)
            .enumerate()
            .map(|(index, (spec, value))| {
                let id = format!("disk{index}");
                Ok(match spec {
                    DiskSpec::Image(spec) => {
                        let image = open_image(&spec).map_err(|reason| ConfigError::DiskImage {
                            value: value.clone(),
                            reason,
                        })?;
                        Disk::Image(ImageDisk { id, spec, image })
                    }
                    DiskSpec::Socket(spec) => {
                        let stream = connect_backend(&spec.path).map_err(|reason| {
                            ConfigError::DiskSocket {
                                value: value.clone(),
                                reason,
                            }
                        })?;
                        Disk::Socket(SocketDisk { id, spec, stream })
                    }
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let nets = net_specs
            .iter()
            .zip(&args.net)
            .enumerate()
            .map(|(index, (spec, value))| {
                crate::net::Nic::open(index, spec).map_err(|reason| ConfigError::Nic {
                    value: value.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let kvm_err = |reason| ConfigError::Kvm {
            path: host.kvm_device.clone(),
            reason,
        };
        let (kvm, max_vcpus) = open_kvm(&host.kvm_device).map_err(kvm_err)?;
        if usize::try_from(cpus).is_ok_and(|n| n > max_vcpus) {
            return Err(ConfigError::Cpus {
                value: args.cpus.clone(),
                reason: CpusError::AboveKvmLimit(max_vcpus),
            });
        }

        Ok(Self {
            cpus,
            memory_bytes,
            cmdline: args.cmdline.clone(),
            kernel_path: args.kernel.clone(),
            kernel_kind,
            kernel,
            initramfs,
            disks,
            nets,
            kvm,
        })
    }
}

fn open_read_only(path: &Path) -> Result<File, FileError> {
    File::open(path).map_err(|source| FileError::Open {
        path: path.to_owned(),
        mode: "",
        source,
    })
}

fn regular_file_len(file: &File, path: &Path) -> Result<u64, FileError> {
    let meta = file.metadata().map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(FileError::NotAFile {
            path: path.to_owned(),
        });
    }
    Ok(meta.len())
}

/// Opens a kernel read-only and recognises its format.
pub fn open_kernel(path: &Path) -> Result<(File, KernelKind), KernelError> {
    let mut file = open_read_only(path)?;
    regular_file_len(&file, path)?;
    let read_err = |source| FileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut header = Vec::with_capacity(KERNEL_HEADER_LEN);
    (&mut file)
        .take(KERNEL_HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(read_err)?;
    let kind = KernelKind::detect(&header)?;
    file.rewind().map_err(read_err)?;
    Ok((file, kind))
}

/// Opens an initramfs read-only and checks that it is a non-empty regular file.
pub fn open_initramfs(path: &Path) -> Result<File, FileError> {
    let file = open_read_only(path)?;
    if regular_file_len(&file, path)? == 0 {
        return Err(FileError::Empty {
            path: path.to_owned(),
        });
    }
    // Reading one byte proves the file is readable (not only openable); `read_at` leaves the
    // file position at the start.
    let mut byte = [0u8; 1];
    file.read_at(&mut byte, 0)
        .map_err(|source| FileError::Read {
            path: path.to_owned(),
            source,
        })?;
    Ok(file)
}

/// Opens a disk image with the mode its spec asks for: `O_RDONLY` when read-only, `O_RDWR`
/// otherwise, plus `O_DIRECT` for `direct=on`.
pub fn open_image(spec: &ImageSpec) -> Result<File, FileError> {
    let path = &spec.path;
    let mut options = OpenOptions::new();
    options.read(true).write(!spec.readonly);
    if spec.direct {
        options.custom_flags(nix::fcntl::OFlag::O_DIRECT.bits());
    }
    let file = options.open(path).map_err(|source| {
        if spec.direct && source.raw_os_error() == Some(nix::libc::EINVAL) {
            FileError::DirectUnsupported {
                path: path.to_owned(),
            }
        } else {
            FileError::Open {
                path: path.to_owned(),
                mode: if spec.readonly { "" } else { " read-write" },
                source,
            }
        }
    })?;
    let meta = file.metadata().map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        return Err(FileError::NotAnImage {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// Connects to an external vhost-user backend's listening socket.
pub fn connect_backend(path: &Path) -> Result<UnixStream, SocketError> {
    // A clearer message than connect(2)'s "Connection refused" for a path that exists but is
    // not a socket.
    if let Ok(meta) = std::fs::metadata(path)
        && !meta.file_type().is_socket()
    {
        return Err(SocketError::NotASocket {
            path: path.to_owned(),
        });
    }
    UnixStream::connect(path).map_err(|source| {
        let path = path.to_owned();
        match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                SocketError::NoListener { path, source }
            }
            _ => SocketError::Connect { path, source },
        }
    })
}

/// Opens the KVM device read-write and returns it with KVM's vCPU limit.
pub fn open_kvm(path: &Path) -> Result<(File, usize), KvmError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => KvmError::NotFound,
            io::ErrorKind::PermissionDenied => KvmError::PermissionDenied,
            _ => KvmError::Open(e),
        })?;
    // A second descriptor for the capability queries: kvm-ioctls' safe constructor opens the
    // path itself, and the one passed to the core stays untouched.
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| KvmError::Open(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let kvm = Kvm::new_with_path(&cpath)
        .map_err(|e| KvmError::Open(io::Error::from_raw_os_error(e.errno())))?;
    match kvm.get_api_version() {
        12 => {}
        v if v < 0 => return Err(KvmError::NotKvm),
        v => return Err(KvmError::ApiVersion(v)),
    }
    Ok((file, kvm.get_max_vcpus()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const GIB: u64 = 1 << 30;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size(" 64M "), Ok(64 << 20));
    }

    #[test]
    fn sizes_that_do_not_parse() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("M"), Err(SizeError::NotANumber));
        assert_eq!(parse_size("-1G"), Err(SizeError::NotANumber));
        assert_eq!(parse_size("1.5G"), Err(SizeError::NotANumber));
        assert_eq!(parse_size("12X"), Err(SizeError::BadSuffix("X".into())));
        assert_eq!(parse_size("1Gig"), Err(SizeError::BadSuffix("Gig".into())));
        assert_eq!(parse_size("99999999999999999999"), Err(SizeError::Overflow));
        assert_eq!(parse_size("16777216T"), Err(SizeError::Overflow));
    }

    #[test]
    fn memory_limits() {
        let host = 16 * GIB;
        assert_eq!(parse_memory("64M", host), Ok(64 << 20));
        assert_eq!(parse_memory("16G", host), Ok(16 * GIB));
        assert_eq!(
            parse_memory("63M", host),
            Err(MemoryError::TooSmall(63 << 20))
        );
        let odd = (64 << 20) + 512;
        assert_eq!(
            parse_memory(&odd.to_string(), host),
            Err(MemoryError::NotPageMultiple(odd))
        );
        assert_eq!(
            parse_memory("17G", host),
            Err(MemoryError::ExceedsHost {
                bytes: 17 * GIB,
                host
            })
        );
        assert_eq!(
            parse_memory("2X", host),
            Err(MemoryError::Size(SizeError::BadSuffix("X".into())))
        );
    }

    #[test]
    fn memory_messages_name_sizes() {
        let e = MemoryError::ExceedsHost {
            bytes: 100 << 40,
            host: 24_684_084 * 1024,
        };
        assert_eq!(
            e.to_string(),
            "100 TiB exceeds the host's total memory of 24105 MiB"
        );
        assert_eq!(
            MemoryError::TooSmall(1 << 20).to_string(),
            "1 MiB is less than the minimum of 64 MiB"
        );
        assert_eq!(Bytes(0).to_string(), "0 bytes");
        assert_eq!(Bytes(512).to_string(), "512 bytes");
        assert_eq!(Bytes(12 << 10).to_string(), "12 KiB");
        assert_eq!(Bytes(3 << 30).to_string(), "3 GiB");
        assert_eq!(Bytes((3 << 30) + (512 << 20)).to_string(), "3584 MiB");
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("1"), Ok(1));
        assert_eq!(parse_cpus("255"), Ok(255));
        assert_eq!(parse_cpus("0"), Err(CpusError::Zero));
        assert_eq!(parse_cpus("256"), Err(CpusError::AboveAtollLimit));
        assert_eq!(parse_cpus("two"), Err(CpusError::NotANumber));
        assert_eq!(parse_cpus("-1"), Err(CpusError::NotANumber));
    }

    #[test]
    fn mem_total_from_meminfo() {
        let text = "MemTotal:       24684084 kB\nMemFree:        23192596 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_684_084 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: x kB\n"), None);
    }

    #[test]
    fn disk_with_every_option() {
        let d =
            DiskSpec::parse("path=/img/a.raw,readonly=on,direct=on,queues=4,serial=ABC 1").unwrap();
        assert_eq!(
            d,
            DiskSpec::Image(ImageSpec {
                path: "/img/a.raw".into(),
                readonly: true,
                direct: true,
                queues: 4,
                serial: Some("ABC 1".into()),
            })
        );
    }

    #[test]
    fn disk_defaults() {
        let d = DiskSpec::parse("path=a.img").unwrap();
        assert_eq!(
            d,
            DiskSpec::Image(ImageSpec {
                path: "a.img".into(),
                readonly: false,
                direct: false,
                queues: 1,
                serial: None,
            })
        );
        assert!(!image_spec("readonly=off,path=x").readonly);
    }

    /// Parses a spec that must be an image disk.
    fn image_spec(text: &str) -> ImageSpec {
        match DiskSpec::parse(text).unwrap() {
            DiskSpec::Image(spec) => spec,
            other => panic!("{text} parsed as {other:?}"),
        }
    }

    #[test]
    fn disk_on_an_external_backend() {
        assert_eq!(
            DiskSpec::parse("socket=/run/qsd/vhost.sock").unwrap(),
            DiskSpec::Socket(SocketSpec {
                path: "/run/qsd/vhost.sock".into(),
                queues: 1,
            })
        );
        let d = DiskSpec::parse("queues=4,socket=s.sock").unwrap();
        assert_eq!(
            d,
            DiskSpec::Socket(SocketSpec {
                path: "s.sock".into(),
                queues: 4,
            })
        );
    }

    #[test]
    fn external_backend_errors() {
        use DiskSpecError as E;
        fn err(s: &str) -> DiskSpecError {
            DiskSpec::parse(s).unwrap_err()
        }
        assert_eq!(err("socket="), E::EmptySocket);
        assert_eq!(err("socket=a,socket=b"), E::Duplicate("socket".into()));
        assert_eq!(err("socket=s,path=a"), E::SocketConflict("path"));
        assert_eq!(err("path=a,socket=s"), E::SocketConflict("path"));
        assert_eq!(err("socket=s,readonly=on"), E::SocketConflict("readonly"));
        // Even a switch that is off: the backend, not atoll, decides.
        assert_eq!(err("socket=s,readonly=off"), E::SocketConflict("readonly"));
        assert_eq!(err("socket=s,direct=on"), E::SocketConflict("direct"));
        assert_eq!(err("socket=s,serial=SN"), E::SocketConflict("serial"));
        assert_eq!(err("socket=s,queues=0"), E::BadQueues("0".into()));
        assert_eq!(err("socket=s,cache=none"), E::UnknownKey("cache".into()));
        assert_eq!(
            E::SocketConflict("readonly").to_string(),
            "socket= cannot be combined with readonly= (an external backend is configured on \
             its own side; only queues= applies)"
        );
        assert_eq!(
            E::MissingPath.to_string(),
            "path=IMG or socket=PATH is required"
        );
    }

    #[test]
    fn disk_errors() {
        use DiskSpecError as E;
        fn err(s: &str) -> DiskSpecError {
            DiskSpec::parse(s).unwrap_err()
        }
        assert_eq!(err("readonly=on"), E::MissingPath);
        assert_eq!(err("path="), E::EmptyPath);
        assert_eq!(err("path=a,,readonly=on"), E::EmptyItem);
        assert_eq!(err("path=a,"), E::EmptyItem);
        assert_eq!(err("a.img"), E::NotKeyValue("a.img".into()));
        assert_eq!(err("path=a,cache=none"), E::UnknownKey("cache".into()));
        assert_eq!(err("path=a,path=b"), E::Duplicate("path".into()));
        assert_eq!(
            err("path=a,readonly=maybe"),
            E::BadSwitch {
                key: "readonly".into(),
                value: "maybe".into()
            }
        );
        assert_eq!(err("path=a,queues=0"), E::BadQueues("0".into()));
        assert_eq!(err("path=a,queues=65"), E::BadQueues("65".into()));
        assert_eq!(err("path=a,queues=x"), E::BadQueues("x".into()));
        assert_eq!(err("path=a,serial="), E::BadSerial(String::new()));
        let long = "x".repeat(MAX_SERIAL_LEN + 1);
        assert_eq!(
            err(&format!("path=a,serial={long}")),
            E::BadSerial(long.clone())
        );
        assert_eq!(err("path=a,serial=\u{e9}"), E::BadSerial("\u{e9}".into()));
    }

    /// A synthetic bzImage header with the given boot protocol.
    pub(crate) fn bzimage_header(protocol: u16) -> Vec<u8> {
        let mut h = vec![0u8; 0x1000];
        h[510..512].copy_from_slice(&0xaa55u16.to_le_bytes());
        h[0x202..0x206].copy_from_slice(b"HdrS");
        h[0x206..0x208].copy_from_slice(&protocol.to_le_bytes());
        h[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        h
    }

    /// A synthetic ELF64 header.
    fn elf_header(class: u8, e_type: u16, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[6] = 1;
        h[16..18].copy_from_slice(&e_type.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn kernel_detection() {
        assert_eq!(
            KernelKind::detect(&bzimage_header(0x020f)).unwrap(),
            KernelKind::BzImage {
                protocol: 0x020f,
                cmdline_size: 2047
            }
        );
        assert_eq!(
            KernelKind::detect(&elf_header(2, 2, 62)).unwrap(),
            KernelKind::Elf
        );
        assert!(matches!(
            KernelKind::detect(&bzimage_header(0x0204)),
            Err(KernelError::OldBootProtocol(0x0204))
        ));
        assert_eq!(
            KernelError::OldBootProtocol(0x0204).to_string(),
            "bzImage boot protocol 2.04 is too old (2.06 or later is needed)"
        );
        for bad in [
            elf_header(1, 2, 62),    // 32-bit
            elf_header(2, 1, 62),    // relocatable object
            elf_header(2, 2, 183),   // aarch64
            vec![0u8; 0x1000],       // zeros
            b"#!/bin/sh\n".to_vec(), // script
            Vec::new(),
        ] {
            assert!(
                matches!(KernelKind::detect(&bad), Err(KernelError::NotAKernel)),
                "{bad:?}"
            );
        }
        let mut no_hdrs = bzimage_header(0x020f);
        no_hdrs[0x202] = b'X';
        assert!(matches!(
            KernelKind::detect(&no_hdrs),
            Err(KernelError::NotAKernel)
        ));
        let mut no_sig = bzimage_header(0x020f);
        no_sig[510] = 0;
        assert!(matches!(
            KernelKind::detect(&no_sig),
            Err(KernelError::NotAKernel)
        ));
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir()
                .join(format!("atoll-config-test-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let p = self.0.join(name);
            std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn kernel_files() {
        let dir = TempDir::new("kernel");
        let bz = dir.file("bzImage", &bzimage_header(0x020f));
        let (mut f, kind) = open_kernel(&bz).unwrap();
        assert!(matches!(kind, KernelKind::BzImage { .. }));
        // The file is handed over positioned at its start.
        assert_eq!(f.stream_position().unwrap(), 0);
        let not = dir.file("notes.txt", b"hello");
        let e = open_kernel(&not).unwrap_err();
        assert_eq!(e.to_string(), "not a Linux kernel (bzImage or ELF vmlinux)");
        let missing = dir.0.join("missing");
        let e = open_kernel(&missing).unwrap_err();
        assert_eq!(e.to_string(), "cannot open: No such file or directory");
        let e = open_kernel(&dir.0).unwrap_err();
        assert_eq!(e.to_string(), "not a regular file");
    }

    #[test]
    fn initramfs_files() {
        let dir = TempDir::new("initramfs");
        assert!(open_initramfs(&dir.file("ok.cpio", b"070701")).is_ok());
        let e = open_initramfs(&dir.file("empty.cpio", b"")).unwrap_err();
        assert!(matches!(e, FileError::Empty { .. }), "{e}");
        let e = open_initramfs(&dir.0.join("nope")).unwrap_err();
        assert!(matches!(e, FileError::Open { .. }), "{e}");
    }

    fn access_mode(file: &File) -> nix::fcntl::OFlag {
        let flags = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        nix::fcntl::OFlag::from_bits_truncate(flags)
    }

    #[test]
    fn images_open_with_the_right_mode() {
        use nix::fcntl::OFlag;
        let dir = TempDir::new("image");
        let img = dir.file("disk.img", &[0u8; 8192]);
        let mut spec = image_spec(&format!("path={}", img.display()));
        let rw = open_image(&spec).unwrap();
        assert_eq!(access_mode(&rw) & OFlag::O_ACCMODE, OFlag::O_RDWR);
        spec.readonly = true;
        let ro = open_image(&spec).unwrap();
        assert_eq!(access_mode(&ro) & OFlag::O_ACCMODE, OFlag::O_RDONLY);
        spec.direct = true;
        match open_image(&spec) {
            Ok(direct) => assert!(access_mode(&direct).contains(OFlag::O_DIRECT)),
            Err(FileError::DirectUnsupported { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        spec.path = dir.0.clone();
        spec.direct = false;
        assert!(matches!(
            open_image(&spec),
            Err(FileError::NotAnImage { .. })
        ));
        spec.path = dir.0.join("missing.img");
        assert!(matches!(open_image(&spec), Err(FileError::Open { .. })));
    }

    #[test]
    fn connects_to_a_listening_backend() {
        use std::io::Read;
        use std::os::unix::net::UnixListener;
        let dir = TempDir::new("socket");
        let path = dir.0.join("backend.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut stream = connect_backend(&path).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        accepted.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        stream.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        drop(listener);
        // Nobody listens any more.
        let e = connect_backend(&path).unwrap_err();
        assert!(matches!(e, SocketError::NoListener { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "cannot connect: Connection refused (is a vhost-user-blk backend listening there?)"
        );
        let e = connect_backend(&dir.0.join("missing.sock")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot connect: No such file or directory (is a vhost-user-blk backend listening \
             there?)"
        );
        let e = connect_backend(&dir.file("plain", b"not a socket")).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket { .. }), "{e}");
        assert_eq!(e.to_string(), "not a UNIX socket");
    }

    #[test]
    fn missing_kvm_device() {
        let e = open_kvm(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(e, KvmError::NotFound));
        let dir = TempDir::new("kvm");
        let e = open_kvm(&dir.file("kvm", b"")).unwrap_err();
        assert!(matches!(e, KvmError::NotKvm), "{e}");
    }
}
