//! Tap devices: opening (and, with `CAP_NET_ADMIN`, creating) the queues of a tap interface,
//! querying an inherited tap descriptor, the interface ioctls the launcher needs (MTU, link
//! up), the per-device ioctls dev-net needs (vnet header size, offloads, queue attach/detach),
//! and one gathered write of a frame from guest memory.
//!
//! Every tap ioctl of atoll lives here: they need `unsafe` (raw `ioctl(2)` on `struct ifreq`),
//! which only this crate may hold. No crate in the workspace's dependency set wraps the tun
//! driver's ioctls, so they are written by hand against `linux/if_tun.h` (constants from
//! `libc`).
//!
//! The tun driver answers most misconfigurations with the same `EINVAL` or `EPERM`; on a failed
//! open, [`open_tap`] looks at the interface (does it exist, which driver runs it, is the tap
//! multi-queue) to say which of the distinct [`TapError`]s it is.

use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;

/// Where the tun/tap clone device lives.
pub const TUN_PATH: &str = "/dev/net/tun";
/// Longest interface name (`IFNAMSIZ` minus the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;
/// Most queues a multi-queue tap can have (`MAX_TAP_QUEUES` in the kernel).
pub const MAX_QUEUES: u16 = 256;
/// Most iovecs one `writev` takes (`UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// `TUNSETOFFLOAD` flags: which offloads the kernel may hand to the tap's reader.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
pub const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
pub const TUN_F_UFO: u32 = libc::TUN_F_UFO;
pub const TUN_F_USO4: u32 = libc::TUN_F_USO4;
pub const TUN_F_USO6: u32 = libc::TUN_F_USO6;

/// Errors of the tap functions. Each misconfiguration a user can make has its own variant.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {name:?} is invalid: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("{queues} queues asked for tap {name}; a tap has 1 to {MAX_QUEUES}")]
    QueueCount { name: String, queues: u16 },
    #[error("{TUN_PATH} does not exist (is the tun module loaded? `modprobe tun`)")]
    TunMissing,
    #[error("no permission to open {TUN_PATH}")]
    TunPermission,
    #[error("cannot open {TUN_PATH}")]
    TunOpen(#[source] io::Error),
    #[error(
        "tap {name} does not exist and creating it needs CAP_NET_ADMIN; create it first: \
         `ip tuntap add {name} mode tap user <uid>`"
    )]
    CreateNotPermitted { name: String },
    #[error(
        "no permission to open tap {name}: its owner or group is not ours (uid {uid}, gid {gid}); \
         give it to us with `ip tuntap add {name} mode tap user {uid}`"
    )]
    NotOwner { name: String, uid: u32, gid: u32 },
    #[error("{name} is a tun device (layer 3, no Ethernet header), not a tap")]
    IsTun { name: String },
    #[error("{name} is {kind}, not a tap")]
    NotTap { name: String, kind: String },
    #[error(
        "tap {name} is single-queue but {queues} queues were asked; recreate it with \
         `ip tuntap add {name} mode tap multi_queue`"
    )]
    SingleQueue { name: String, queues: u16 },
    #[error("tap {name} is single-queue and another process has it open")]
    Busy { name: String },
    #[error("tap {name}: opening queue {index} of {queues} failed")]
    Attach {
        name: String,
        index: u16,
        queues: u16,
        #[source]
        source: io::Error,
    },
    #[error("descriptor {fd} is not a tun/tap device")]
    NotTunFd {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("descriptor {fd} is a tun/tap file not attached to any interface")]
    Unattached { fd: RawFd },
    #[error("no interface named {name}")]
    NoSuchInterface { name: String },
    #[error("{op} on {name} needs CAP_NET_ADMIN")]
    NotPermitted { op: &'static str, name: String },
    #[error("cannot create a socket for interface ioctls")]
    Socket(#[source] nix::Error),
    #[error("{op} on {target} failed")]
    Ioctl {
        op: &'static str,
        target: String,
        #[source]
        source: io::Error,
    },
}

/// The queues of one tap interface, each an open `/dev/net/tun` file attached to it.
#[derive(Debug)]
pub struct TapQueues {
    /// The interface name.
    pub name: String,
    /// One descriptor per queue (close-on-exec), opened `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
    pub fds: Vec<OwnedFd>,
    /// True when [`open_tap`] created the interface (it disappears with the last descriptor).
    pub created: bool,
}

/// What `TUNGETIFF` says about a tun/tap descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapInfo {
    pub name: String,
    /// Opened with `IFF_VNET_HDR`: frames carry a `virtio_net_hdr`.
    pub vnet_hdr: bool,
    /// The interface is multi-queue (`IFF_MULTI_QUEUE`).
    pub multi_queue: bool,
    /// A tap (Ethernet frames), not a tun (IP packets).
    pub is_tap: bool,
}

/// Checks an interface name the way the kernel's `dev_valid_name` does.
pub fn validate_name(name: &str) -> Result<(), TapError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 15 bytes (IFNAMSIZ)")
    } else if name == "." || name == ".." {
        Some("it is a path component")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        Some("it contains '/', ':', NUL or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TapError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Opens `queues` queues of the tap `name` (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, plus
/// `IFF_MULTI_QUEUE` when `queues > 1` or when the existing tap is multi-queue), creating the
/// interface if it does not exist (which needs `CAP_NET_ADMIN`; see [`TapQueues::created`]).
/// The descriptors are blocking and close-on-exec.
pub fn open_tap(name: &str, queues: u16) -> Result<TapQueues, TapError> {
    validate_name(name)?;
    if queues == 0 || queues > MAX_QUEUES {
        return Err(TapError::QueueCount {
            name: name.to_owned(),
            queues,
        });
    }
    let existed = interface_index(name)?.is_some();
    let mut multi_queue = queues > 1;
    let first = match set_iff(name, multi_queue) {
        Ok(fd) => fd,
        Err(OpenFailure::Open(e)) => return Err(e),
        Err(OpenFailure::Ioctl(errno)) => {
            match diagnose(name, queues, existed, errno)? {
                // A single queue of a multi-queue tap: open it as what it is.
                Diagnosis::MultiQueueTap => {
                    multi_queue = true;
                    set_iff(name, true).map_err(|f| match f {
                        OpenFailure::Open(e) => e,
                        OpenFailure::Ioctl(source) => TapError::Attach {
                            name: name.to_owned(),
                            index: 0,
                            queues,
                            source,
                        },
                    })?
                }
                Diagnosis::Error(e) => return Err(e),
            }
        }
    };
    let mut fds = Vec::with_capacity(usize::from(queues));
    fds.push(first);
    for index in 1..queues {
        let fd = set_iff(name, multi_queue).map_err(|f| match f {
            OpenFailure::Open(e) => e,
            OpenFailure::Ioctl(source) => TapError::Attach {
                name: name.to_owned(),
                index,
                queues,
                source,
            },
        })?;
        fds.push(fd);
    }
    Ok(TapQueues {
        name: name.to_owned(),
        fds,
        created: !existed,
    })
}

enum OpenFailure {
    Open(TapError),
    Ioctl(io::Error),
}

enum Diagnosis {
    MultiQueueTap,
    Error(TapError),
}

/// Opens `/dev/net/tun` and attaches it to `name` with `TUNSETIFF`.
fn set_iff(name: &str, multi_queue: bool) -> Result<OwnedFd, OpenFailure> {
    let file = open_tun().map_err(OpenFailure::Open)?;
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    let mut req = ifreq(name).map_err(OpenFailure::Open)?;
    req.ifr_ifru.ifru_flags = c_short(flags);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is; the descriptor is
    // an open /dev/net/tun file owned by `file`.
    unsafe { ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF, &raw mut req) }
        .map_err(OpenFailure::Ioctl)?;
    Ok(OwnedFd::from(file))
}

fn open_tun() -> Result<File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TapError::TunMissing,
            Some(libc::EACCES | libc::EPERM) => TapError::TunPermission,
            _ => TapError::TunOpen(e),
        })
}

/// Turns a failed `TUNSETIFF` into the error that says why.
fn diagnose(name: &str, queues: u16, existed: bool, err: io::Error) -> Result<Diagnosis, TapError> {
    let name_s = name.to_owned();
    let e = match err.raw_os_error() {
        Some(libc::EPERM) if !existed => TapError::CreateNotPermitted { name: name_s },
        Some(libc::EPERM) => TapError::NotOwner {
            name: name_s,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        },
        Some(libc::EBUSY) => TapError::Busy { name: name_s },
        Some(libc::EINVAL) if existed => match driver_info(name) {
            Some((driver, bus)) if driver == "tun" && bus == "tun" => {
                TapError::IsTun { name: name_s }
            }
            Some((driver, _)) if driver == "tun" => {
                // A tap that refused our queue mode.
                if queues > 1 {
                    TapError::SingleQueue {
                        name: name_s,
                        queues,
                    }
                } else {
                    return Ok(Diagnosis::MultiQueueTap);
                }
            }
            Some((driver, _)) if !driver.is_empty() => TapError::NotTap {
                name: name_s,
                kind: format!("a {driver} interface"),
            },
            _ => TapError::NotTap {
                name: name_s,
                kind: "another kind of interface".to_owned(),
            },
        },
        _ => TapError::Attach {
            name: name_s,
            index: 0,
            queues,
            source: err,
        },
    };
    Ok(Diagnosis::Error(e))
}

/// The interface's index, or `None` when no interface has that name (in our network
/// namespace).
fn interface_index(name: &str) -> Result<Option<u32>, TapError> {
    let c = CString::new(name).map_err(|_| TapError::InvalidName {
        name: name.to_owned(),
        reason: "it contains NUL",
    })?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call; if_nametoindex only
    // reads it.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODEV | libc::ENXIO) => Ok(None),
            _ => Err(TapError::Ioctl {
                op: "SIOCGIFINDEX",
                target: name.to_owned(),
                source: e,
            }),
        };
    }
    Ok(Some(index))
}

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
#[allow(
    dead_code,
    reason = "filled in by the kernel; only driver and bus_info are read"
)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

const ETHTOOL_GDRVINFO: u32 = 0x3;

/// The driver and bus names of interface `name` (`SIOCETHTOOL ETHTOOL_GDRVINFO`); the tun
/// driver reports `("tun", "tun")` for tun devices and `("tun", "tap")` for taps. `None` when
/// the interface's driver does not answer.
fn driver_info(name: &str) -> Option<(String, String)> {
    let sock = datagram_socket().ok()?;
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    let mut req = ifreq(name).ok()?;
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO reads the `ifreq` and writes one
    // `struct ethtool_drvinfo` through `ifru_data`, which points at `info`; both live until
    // the call returns.
    unsafe { ioctl_ptr(sock.as_raw_fd(), libc::SIOCETHTOOL, &raw mut req) }.ok()?;
    let text = |b: &[u8]| {
        CStr::from_bytes_until_nul(b)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Some((text(&info.driver), text(&info.bus_info)))
}

/// Describes an open tun/tap descriptor (`TUNGETIFF`), for example one passed as
/// `--net fd=N`.
pub fn tap_info(fd: BorrowedFd<'_>) -> Result<TapInfo, TapError> {
    let raw = fd.as_raw_fd();
    let mut req = zeroed_ifreq();
    // SAFETY: TUNGETIFF writes one `struct ifreq`, which `req` is. On a descriptor that is not
    // a tun file the ioctl fails (ENOTTY/EINVAL) without writing anything.
    unsafe { ioctl_ptr(raw, libc::TUNGETIFF, &raw mut req) }.map_err(|source| {
        if source.raw_os_error() == Some(libc::EBADFD) {
            TapError::Unattached { fd: raw }
        } else {
            TapError::NotTunFd { fd: raw, source }
        }
    })?;
    // SAFETY: TUNGETIFF filled in `ifru_flags` (and zeroed memory is a valid c_short anyway).
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    Ok(TapInfo {
        name: name_of(&req),
        vnet_hdr: flags & libc::IFF_VNET_HDR != 0,
        multi_queue: flags & libc::IFF_MULTI_QUEUE != 0,
        is_tap: flags & libc::IFF_TAP != 0,
    })
}

/// The MTU of interface `name` (`SIOCGIFMTU`).
pub fn interface_mtu(name: &str) -> Result<u32, TapError> {
    let sock = datagram_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFMTU reads the name and writes `ifru_mtu` of the `ifreq` `req` points to.
    unsafe { ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFMTU, &raw mut req) }
        .map_err(|e| interface_error("SIOCGIFMTU", name, e))?;
    // SAFETY: SIOCGIFMTU succeeded, so `ifru_mtu` holds the MTU.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| TapError::Ioctl {
        op: "SIOCGIFMTU",
        target: name.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, format!("negative MTU {mtu}")),
    })
}

/// Sets interface `name` up (`IFF_UP` through `SIOCGIFFLAGS` / `SIOCSIFFLAGS`); nothing
/// happens if it already is. Needs `CAP_NET_ADMIN` otherwise.
pub fn set_link_up(name: &str) -> Result<(), TapError> {
    let sock = datagram_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS reads the name and writes `ifru_flags` of `req`.
    unsafe { ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) }
        .map_err(|e| interface_error("SIOCGIFFLAGS", name, e))?;
    // SAFETY: SIOCGIFFLAGS succeeded, so `ifru_flags` holds the flags.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    if flags & libc::IFF_UP != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = c_short(flags | libc::IFF_UP);
    // SAFETY: SIOCSIFFLAGS reads the name and `ifru_flags` of `req`.
    unsafe { ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut req) }
        .map_err(|e| interface_error("SIOCSIFFLAGS", name, e))
}

fn interface_error(op: &'static str, name: &str, e: io::Error) -> TapError {
    match e.raw_os_error() {
        Some(libc::ENODEV) => TapError::NoSuchInterface {
            name: name.to_owned(),
        },
        Some(libc::EPERM | libc::EACCES) => TapError::NotPermitted {
            op,
            name: name.to_owned(),
        },
        _ => TapError::Ioctl {
            op,
            target: name.to_owned(),
            source: e,
        },
    }
}

/// Sets the size of the vnet header that prefixes every frame (`TUNSETVNETHDRSZ`; at least
/// 10, the size of `struct virtio_net_hdr`). It applies to the whole interface.
pub fn set_vnet_hdr_size(fd: BorrowedFd<'_>, size: i32) -> Result<(), TapError> {
    let mut value: libc::c_int = size;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which points at `value`.
    unsafe { ioctl_ptr(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &raw mut value) }
        .map_err(|source| fd_error("TUNSETVNETHDRSZ", fd, source))
}

/// Sets which offloads the kernel may hand to the tap's reader (`TUNSETOFFLOAD` with
/// `TUN_F_*` flags): partially checksummed frames with `TUN_F_CSUM`, TCP segmentation
/// offload frames with `TUN_F_TSO4/6`, and so on. It applies to the whole interface. Flags
/// the kernel does not know fail with `EINVAL`.
pub fn set_offload(fd: BorrowedFd<'_>, flags: u32) -> Result<(), TapError> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of TUN_F_* flags) };
    // no memory is passed.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if ret < 0 {
        return Err(fd_error("TUNSETOFFLOAD", fd, io::Error::last_os_error()));
    }
    Ok(())
}

/// Finds which `TUN_F_*` offloads the tap accepts by trying them, and leaves the offloads
/// off. `TUN_F_USO4` and `TUN_F_USO6` are only accepted together, and `TUN_F_TSO_ECN` only
/// with a TSO flag; the result has them as the kernel took them.
pub fn probe_offloads(fd: BorrowedFd<'_>) -> Result<u32, TapError> {
    let mut accepted = 0u32;
    if set_offload(fd, TUN_F_CSUM).is_ok() {
        accepted |= TUN_F_CSUM;
        for extra in [
            TUN_F_TSO4,
            TUN_F_TSO6,
            TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
            TUN_F_UFO,
            TUN_F_USO4 | TUN_F_USO6,
        ] {
            if set_offload(fd, TUN_F_CSUM | extra).is_ok() {
                accepted |= extra;
            }
        }
    }
    set_offload(fd, 0)?;
    Ok(accepted)
}

/// Attaches the queue `fd` to its multi-queue tap again, or detaches it (`TUNSETQUEUE` with
/// `IFF_ATTACH_QUEUE` / `IFF_DETACH_QUEUE`). A detached queue gets no frames and its pending
/// frames are dropped. Attaching an attached queue, or detaching a detached one, fails with
/// `EINVAL`.
pub fn set_queue_attached(fd: BorrowedFd<'_>, attached: bool) -> Result<(), TapError> {
    let mut req = zeroed_ifreq();
    req.ifr_ifru.ifru_flags = c_short(if attached {
        libc::IFF_ATTACH_QUEUE
    } else {
        libc::IFF_DETACH_QUEUE
    });
    let op = if attached {
        "TUNSETQUEUE(attach)"
    } else {
        "TUNSETQUEUE(detach)"
    };
    // SAFETY: TUNSETQUEUE reads `ifru_flags` of the `ifreq` `req` points to.
    unsafe { ioctl_ptr(fd.as_raw_fd(), libc::TUNSETQUEUE, &raw mut req) }
        .map_err(|source| fd_error(op, fd, source))
}

fn fd_error(op: &'static str, fd: BorrowedFd<'_>, source: io::Error) -> TapError {
    TapError::Ioctl {
        op,
        target: format!("descriptor {}", fd.as_raw_fd()),
        source,
    }
}

/// Writes one frame to the tap: `header` (a local copy of the vnet header) followed by
/// `frame` in guest memory, with one `writev` (the tap takes each write as one frame). At
/// most [`IOV_MAX`]` - 1` slices; `EINTR` is retried.
pub fn write_frame<B: BitmapSlice>(
    fd: BorrowedFd<'_>,
    header: &[u8],
    frame: &[VolatileSlice<'_, B>],
) -> io::Result<usize> {
    if frame.len() >= IOV_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} slices exceed the writev limit", frame.len() + 1),
        ));
    }
    // The guards keep each slice's memory mapped while the kernel reads it.
    let guards: Vec<_> = frame.iter().map(VolatileSlice::ptr_guard).collect();
    let mut iov = Vec::with_capacity(frame.len() + 1);
    iov.push(libc::iovec {
        iov_base: header.as_ptr().cast_mut().cast(),
        iov_len: header.len(),
    });
    for (slice, guard) in frame.iter().zip(&guards) {
        iov.push(libc::iovec {
            iov_base: guard.as_ptr().cast_mut().cast(),
            iov_len: slice.len(),
        });
    }
    let count =
        libc::c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: every iovec points at memory valid for `iov_len` bytes for the whole call:
        // `header` is borrowed, and each guest slice is a `VolatileSlice` borrowed by our
        // caller whose pointer guard is alive in `guards`. writev only reads through them.
        let ret = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), count) };
        if let Ok(n) = usize::try_from(ret) {
            return Ok(n);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn datagram_socket() -> Result<OwnedFd, TapError> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(TapError::Socket)
}

fn zeroed_ifreq() -> libc::ifreq {
    // SAFETY: `struct ifreq` is plain old data (a byte array and a union of integers, byte
    // arrays and pointers), for which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// An `ifreq` naming `name` (validated: fits `IFNAMSIZ` with its NUL).
fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    validate_name(name)?;
    let mut req = zeroed_ifreq();
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    Ok(req)
}

fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `IFF_*` flags as the `short` of `ifru_flags`, bit for bit (bit 15, `IFF_TUN_EXCL` or
/// `IFF_DYNAMIC`, becomes the sign bit, as in C).
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "ifru_flags is a 16-bit field; the kernel reads these bits back as unsigned"
)]
fn c_short(flags: libc::c_int) -> libc::c_short {
    (flags & 0xffff) as u16 as libc::c_short
}

/// `ioctl(fd, request, ptr)`, with `errno` as the error.
///
/// # Safety
///
/// `request` must be an ioctl whose argument is a pointer to one `T`, and `ptr` must point to
/// a live `T` (with whatever it points to in turn) for the duration of the call.
unsafe fn ioctl_ptr<T>(fd: RawFd, request: libc::Ioctl, ptr: *mut T) -> io::Result<()> {
    // SAFETY: the caller guarantees that `request` takes a pointer to one `T` and that `ptr`
    // is valid for it.
    let ret = unsafe { libc::ioctl(fd, request, ptr) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::process::Command;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    use super::*;

    /// Moves the calling test thread into a network namespace of its own, so the interfaces a
    /// test creates are invisible to everything else and vanish with the thread. Panics (the
    /// test fails) when the namespace cannot be created.
    fn private_netns() {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): the tap tests need root to create a network namespace");
    }

    /// Runs `ip args...` (in the calling thread's network namespace) and fails the test if it
    /// fails.
    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn flags_of(name: &str) -> i32 {
        let sock = datagram_socket().unwrap();
        let mut req = ifreq(name).unwrap();
        // SAFETY: SIOCGIFFLAGS reads the name and writes `ifru_flags` of `req`.
        unsafe { ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) }.unwrap();
        // SAFETY: the ioctl succeeded and filled in `ifru_flags`.
        i32::from(unsafe { req.ifr_ifru.ifru_flags })
    }

    #[test]
    fn names_are_validated_like_the_kernel_does() {
        for bad in [
            "",
            "0123456789abcdef",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\0b",
        ] {
            assert!(
                matches!(validate_name(bad), Err(TapError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
        for good in ["tap0", "0123456789abcde", "vm-1.net_0"] {
            validate_name(good).unwrap();
        }
        let err = open_tap("0123456789abcdef", 1).unwrap_err();
        assert!(err.to_string().contains("longer than 15"), "{err}");
        assert!(matches!(
            open_tap("tap0", 0),
            Err(TapError::QueueCount { queues: 0, .. })
        ));
        assert!(matches!(
            open_tap("tap0", 257),
            Err(TapError::QueueCount { queues: 257, .. })
        ));
    }

    #[test]
    fn creates_a_tap_and_describes_it() {
        private_netns();
        let tap = open_tap("atl0", 1).unwrap();
        assert!(tap.created);
        assert_eq!(tap.name, "atl0");
        assert_eq!(tap.fds.len(), 1);
        let info = tap_info(tap.fds[0].as_fd()).unwrap();
        assert_eq!(
            info,
            TapInfo {
                name: "atl0".into(),
                vnet_hdr: true,
                multi_queue: false,
                is_tap: true
            }
        );
        assert_eq!(interface_mtu("atl0").unwrap(), 1500);
        ip(&["link", "set", "atl0", "mtu", "9000"]);
        assert_eq!(interface_mtu("atl0").unwrap(), 9000);
        assert_eq!(flags_of("atl0") & libc::IFF_UP, 0);
        set_link_up("atl0").unwrap();
        assert_ne!(flags_of("atl0") & libc::IFF_UP, 0);
        set_link_up("atl0").unwrap();
        // A second open of a single-queue tap that is in use.
        assert!(matches!(
            open_tap("atl0", 1),
            Err(TapError::Busy { name }) if name == "atl0"
        ));
        drop(tap);
        // Created by us and not persistent: gone with its last descriptor. (A process that
        // another test thread forks at the wrong moment holds a copy until its exec, so wait.)
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while interface_index("atl0").unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "atl0 outlived its descriptor"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(
            interface_mtu("atl0"),
            Err(TapError::NoSuchInterface { .. })
        ));
        assert!(matches!(
            set_link_up("atl0"),
            Err(TapError::NoSuchInterface { .. })
        ));
    }

    #[test]
    fn multi_queue_taps_attach_and_detach_queues() {
        private_netns();
        let tap = open_tap("atl1", 3).unwrap();
        assert!(tap.created);
        assert_eq!(tap.fds.len(), 3);
        for fd in &tap.fds {
            let info = tap_info(fd.as_fd()).unwrap();
            assert!(info.multi_queue && info.vnet_hdr && info.is_tap, "{info:?}");
        }
        let q = tap.fds[2].as_fd();
        set_queue_attached(q, false).unwrap();
        let again = set_queue_attached(q, false).unwrap_err();
        assert!(again.to_string().contains("TUNSETQUEUE(detach)"), "{again}");
        set_queue_attached(q, true).unwrap();
        assert!(set_queue_attached(q, true).is_err());
        // More queues of the same tap can be opened later (the launcher's restart does not).
        let more = open_tap("atl1", 2).unwrap();
        assert!(!more.created);
    }

    #[test]
    fn existing_interfaces_of_the_wrong_kind_or_mode_are_refused_clearly() {
        private_netns();
        ip(&["tuntap", "add", "sq0", "mode", "tap"]);
        ip(&["tuntap", "add", "mq0", "mode", "tap", "multi_queue"]);
        ip(&["tuntap", "add", "tun0", "mode", "tun"]);
        ip(&["link", "add", "br0", "type", "bridge"]);

        let err = open_tap("sq0", 2).unwrap_err();
        assert!(
            matches!(&err, TapError::SingleQueue { name, queues: 2 } if name == "sq0"),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("ip tuntap add sq0 mode tap multi_queue"),
            "{err}"
        );
        let sq = open_tap("sq0", 1).unwrap();
        assert!(!sq.created, "sq0 existed");
        assert!(!tap_info(sq.fds[0].as_fd()).unwrap().multi_queue);

        // One queue of a multi-queue tap is opened as multi-queue.
        let mq = open_tap("mq0", 1).unwrap();
        assert!(!mq.created);
        assert!(tap_info(mq.fds[0].as_fd()).unwrap().multi_queue);

        let err = open_tap("tun0", 1).unwrap_err();
        assert!(
            matches!(&err, TapError::IsTun { name } if name == "tun0"),
            "{err:?}"
        );
        let err = open_tap("br0", 1).unwrap_err();
        assert!(
            matches!(&err, TapError::NotTap { name, kind } if name == "br0" && kind == "a bridge interface"),
            "{err:?}"
        );
        let err = open_tap("lo", 2).unwrap_err();
        assert!(matches!(&err, TapError::NotTap { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "lo is another kind of interface, not a tap"
        );
    }

    #[test]
    fn tap_info_refuses_other_descriptors() {
        let null = File::open("/dev/null").unwrap();
        let err = tap_info(null.as_fd()).unwrap_err();
        assert!(
            matches!(err, TapError::NotTunFd { fd, .. } if fd == null.as_raw_fd()),
            "{err:?}"
        );
        let sock = datagram_socket().unwrap();
        assert!(matches!(
            tap_info(sock.as_fd()),
            Err(TapError::NotTunFd { .. })
        ));
        // /dev/net/tun opened but never attached to an interface.
        let unattached = open_tun().unwrap();
        let err = tap_info(unattached.as_fd()).unwrap_err();
        assert!(matches!(err, TapError::Unattached { .. }), "{err:?}");
    }

    #[test]
    fn offloads_are_probed_and_set() {
        private_netns();
        let tap = open_tap("atl2", 1).unwrap();
        let fd = tap.fds[0].as_fd();
        let accepted = probe_offloads(fd).unwrap();
        // Every kernel with vnet headers takes checksum and TCP segmentation offloads.
        let basic = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        assert_eq!(accepted & basic, basic, "{accepted:#x}");
        // USO comes in pairs or not at all.
        assert!(
            accepted & (TUN_F_USO4 | TUN_F_USO6) == 0
                || accepted & (TUN_F_USO4 | TUN_F_USO6) == TUN_F_USO4 | TUN_F_USO6
        );
        set_offload(fd, accepted).unwrap();
        set_offload(fd, 0).unwrap();
        // Unknown flags, TSO without CSUM and ECN without TSO are refused.
        assert!(set_offload(fd, 1 << 20).is_err());
        assert!(set_offload(fd, TUN_F_TSO4).is_err());
        assert!(set_offload(fd, TUN_F_CSUM | TUN_F_TSO_ECN).is_err());
        set_vnet_hdr_size(fd, 12).unwrap();
        set_vnet_hdr_size(fd, 10).unwrap();
        assert!(set_vnet_hdr_size(fd, 4).is_err());
        let null = File::open("/dev/null").unwrap();
        assert!(set_offload(null.as_fd(), 0).is_err());
    }

    /// An IPv4/UDP frame from `src_mac` 10.77.0.2:4000 to `dst_mac` 10.77.0.1:`port`.
    fn udp_frame(dst_mac: [u8; 6], port: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst_mac);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = u16::try_from(20 + 8 + payload.len()).unwrap();
        let mut iph = [0u8; 20];
        iph[0] = 0x45;
        iph[2..4].copy_from_slice(&total.to_be_bytes());
        iph[8] = 64;
        iph[9] = 17;
        iph[12..16].copy_from_slice(&[10, 77, 0, 2]);
        iph[16..20].copy_from_slice(&[10, 77, 0, 1]);
        let sum = iph
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum::<u32>();
        let folded = (sum & 0xffff) + (sum >> 16);
        let csum = !u16::try_from((folded & 0xffff) + (folded >> 16)).unwrap();
        iph[10..12].copy_from_slice(&csum.to_be_bytes());
        f.extend_from_slice(&iph);
        f.extend_from_slice(&4000u16.to_be_bytes());
        f.extend_from_slice(&port.to_be_bytes());
        f.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
        f.extend_from_slice(&[0, 0]); // no UDP checksum
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn write_frame_sends_one_frame_gathered_from_guest_memory() {
        private_netns();
        let tap = open_tap("atl3", 1).unwrap();
        let mac = [0x02, 0, 0, 0, 0, 0x01];
        ip(&["link", "set", "atl3", "address", "02:00:00:00:00:01"]);
        ip(&["addr", "add", "10.77.0.1/24", "dev", "atl3"]);
        set_link_up("atl3").unwrap();
        let rx = UdpSocket::bind("10.77.0.1:5555").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

        let payload: Vec<u8> = (0..3000u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let frame = udp_frame(mac, 5555, &payload);
        // The frame split over two regions of "guest memory", in three pieces.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap();
        let split = [
            (0xff00u64, 0x100usize),
            (0x1_0000, 0x200),
            (0x4000, frame.len() - 0x300),
        ];
        let mut at = 0;
        let mut slices = Vec::new();
        for &(addr, len) in &split {
            mem.write_slice(&frame[at..at + len], GuestAddress(addr))
                .unwrap();
            slices.push(mem.get_slice(GuestAddress(addr), len).unwrap());
            at += len;
        }
        // A vnet header of 10 bytes (the tap's default size): no offloads.
        let header = [0u8; 10];
        let n = write_frame(tap.fds[0].as_fd(), &header, &slices).unwrap();
        assert_eq!(n, 10 + frame.len());
        let mut buf = vec![0u8; 4096];
        let (got, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..got], &payload[..]);
        assert_eq!(from.to_string(), "10.77.0.2:4000");

        // Too many slices for one writev.
        let many: Vec<_> = (0..IOV_MAX)
            .map(|i| {
                mem.get_slice(GuestAddress(u64::try_from(i).unwrap()), 1)
                    .unwrap()
            })
            .collect();
        assert!(write_frame(tap.fds[0].as_fd(), &header, &many).is_err());
    }

    const CHILD_ENV: &str = "ATOLL_TAP_TEST_CHILD";

    /// Runs without any capability in a child process (see
    /// `missing_privileges_are_named`); does nothing in a normal test run.
    #[test]
    #[ignore = "started as a child process by missing_privileges_are_named"]
    fn child_without_capabilities() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let missing = open_tap("atl-new", 1).unwrap_err();
        let foreign = open_tap("atl-owned", 1).unwrap_err();
        let up = set_link_up("atl-owned").unwrap_err();
        println!("RESULT {missing:?}");
        println!("RESULT {foreign:?}");
        println!("RESULT {up:?}");
    }

    #[test]
    fn missing_privileges_are_named() {
        private_netns();
        ip(&[
            "tuntap",
            "add",
            "atl-owned",
            "mode",
            "tap",
            "user",
            "4242",
            "group",
            "4242",
        ]);
        // Root without any capability: /dev/net/tun (owned by root) opens, but creating an
        // interface or opening someone else's tap needs CAP_NET_ADMIN.
        let out = Command::new("setpriv")
            .args([
                "--inh-caps=-all",
                "--ambient-caps=-all",
                "--bounding-set=-all",
                "--",
            ])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tap::tests::child_without_capabilities",
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .expect("run setpriv");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {stdout}");
        let results: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
            .collect();
        assert_eq!(results.len(), 3, "{stdout}");
        assert!(
            results[0].starts_with("CreateNotPermitted"),
            "{}",
            results[0]
        );
        assert!(
            results[1].starts_with("NotOwner { name: \"atl-owned\", uid: 0, gid: 0 }"),
            "{}",
            results[1]
        );
        assert!(results[2].starts_with("NotPermitted"), "{}", results[2]);
    }
}
