//! `--net`: network cards on tap devices, each served by its own `dev-net` process.
//!
//! The launcher opens the tap (one descriptor per queue pair; it creates the interface when it
//! does not exist and atoll has CAP_NET_ADMIN) or takes a tap descriptor a management layer
//! passed it (`fd=N`), and hands the descriptors to `dev-net`: neither `dev-net` nor the core
//! ever opens a path or creates an interface.

#![forbid(unsafe_code)]

use ipc::inherit::{InheritError, take_inherited_fd};
use ipc::tap::{TapError, TapInfo, TapQueues, interface_mtu, open_tap, set_link_up, tap_info};
use std::fmt;
use std::os::fd::{AsFd, OwnedFd, RawFd};

/// The most queue pairs one NIC may have.
pub const MAX_NET_QUEUES: u16 = 16;
/// The longest interface name (IFNAMSIZ minus the NUL).
const IFNAMSIZ: usize = 15;

/// Why a `--net` value does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetSpecError {
    #[error("tap=NAME or fd=N is required")]
    MissingBackend,
    #[error("empty item (stray comma)")]
    EmptyItem,
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    #[error("unknown option '{0}' (expected tap, fd, mac or queues)")]
    UnknownKey(String),
    #[error("'{0}' is given twice")]
    Duplicate(String),
    #[error("tap= and fd= exclude each other")]
    TapAndFd,
    #[error(
        "tap={0}: not an interface name (1 to {IFNAMSIZ} characters, no '/', ':', whitespace or NUL)"
    )]
    BadTapName(String),
    #[error("fd={0}: expected a descriptor number above 2")]
    BadFd(String),
    #[error("mac={0}: {1}")]
    BadMac(String, MacError),
    #[error("queues={0}: expected a number of queue pairs from 1 to {MAX_NET_QUEUES}")]
    BadQueues(String),
    #[error("queues={0} needs tap=NAME: one fd= descriptor is one queue pair")]
    QueuesWithFd(u16),
}

/// Why a MAC address is not acceptable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("expected six hexadecimal bytes separated by colons, e.g. 52:54:00:12:34:56")]
    Syntax,
    #[error("a multicast address (lowest bit of the first byte set) cannot be a NIC's address")]
    Multicast,
    #[error("the all-zero address cannot be a NIC's address")]
    Zero,
}

/// Why a NIC's tap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("descriptor {fd} was not passed to atoll")]
    Inherit {
        fd: RawFd,
        #[source]
        source: InheritError,
    },
    #[error("descriptor {fd} is not a tap device (it is a tun device)")]
    NotTap { fd: RawFd },
    #[error(
        "descriptor {fd} (tap {name}) was opened without IFF_VNET_HDR, which dev-net needs for checksum and segmentation offloads"
    )]
    NoVnetHeader { fd: RawFd, name: String },
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Parses `aa:bb:cc:dd:ee:ff` (also `-` separators).
    pub fn parse(text: &str) -> Result<Self, MacError> {
        let parts: Vec<&str> = text.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(MacError::Syntax);
        }
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(MacError::Syntax);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacError::Syntax)?;
        }
        if mac[0] & 1 != 0 {
            return Err(MacError::Multicast);
        }
        if mac == [0; 6] {
            return Err(MacError::Zero);
        }
        Ok(Self(mac))
    }

    /// A stable locally administered unicast address for NIC `index` on `backend` (the tap
    /// name, or the descriptor number): the same command line gives the guest the same MAC
    /// every time. FNV-1a, written here because it is eight lines and must never change
    /// between Rust releases (std's hashers may).
    pub fn stable(index: usize, backend: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in format!("atoll-net:{index}:{backend}").bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        // Locally administered (bit 1), unicast (bit 0 clear).
        Self([(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Where a NIC's frames go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    /// A tap interface atoll opens (or creates).
    Tap(String),
    /// A tap descriptor atoll inherited.
    Fd(RawFd),
}

/// One `--net` value, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    pub backend: NetBackend,
    pub mac: Option<Mac>,
    /// Queue pairs.
    pub queues: u16,
}

impl NetSpec {
    /// Parses `tap=NAME[,mac=MAC][,queues=N]` or `fd=N[,mac=MAC]`.
    pub fn parse(text: &str) -> Result<Self, NetSpecError> {
        let mut tap = None;
        let mut fd = None;
        let mut mac = None;
        let mut queues = None;
        let mut seen: Vec<&str> = Vec::new();
        for item in text.split(',') {
            if item.is_empty() {
                return Err(NetSpecError::EmptyItem);
            }
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| NetSpecError::NotKeyValue(item.to_owned()))?;
            if seen.contains(&key) {
                return Err(NetSpecError::Duplicate(key.to_owned()));
            }
            match key {
                "tap" => {
                    let ok = !value.is_empty()
                        && value.len() <= IFNAMSIZ
                        && value != "."
                        && value != ".."
                        && !value
                            .chars()
                            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
                    if !ok {
                        return Err(NetSpecError::BadTapName(value.to_owned()));
                    }
                    tap = Some(value.to_owned());
                }
                "fd" => {
                    let n: RawFd = value
                        .parse()
                        .ok()
                        .filter(|&n| n > 2)
                        .ok_or_else(|| NetSpecError::BadFd(value.to_owned()))?;
                    fd = Some(n);
                }
                "mac" => {
                    mac = Some(
                        Mac::parse(value).map_err(|e| NetSpecError::BadMac(value.to_owned(), e))?,
                    );
                }
                "queues" => {
                    let n: u16 = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_NET_QUEUES).contains(n))
                        .ok_or_else(|| NetSpecError::BadQueues(value.to_owned()))?;
                    queues = Some(n);
                }
                _ => return Err(NetSpecError::UnknownKey(key.to_owned())),
            }
            seen.push(key);
        }
        let backend = match (tap, fd) {
            (Some(_), Some(_)) => return Err(NetSpecError::TapAndFd),
            (Some(name), None) => NetBackend::Tap(name),
            (None, Some(fd)) => {
                if let Some(n) = queues.filter(|&n| n != 1) {
                    return Err(NetSpecError::QueuesWithFd(n));
                }
                NetBackend::Fd(fd)
            }
            (None, None) => return Err(NetSpecError::MissingBackend),
        };
        Ok(Self {
            backend,
            mac,
            queues: queues.unwrap_or(1),
        })
    }
}

/// A validated NIC: its tap descriptors open.
#[derive(Debug)]
pub struct Nic {
    /// `net<N>`.
    pub id: String,
    pub mac: Mac,
    /// The tap interface's name.
    pub ifname: String,
    /// One descriptor per queue pair.
    pub taps: Vec<OwnedFd>,
    /// The tap's MTU, advertised to the guest.
    pub mtu: Option<u16>,
}

impl Nic {
    /// Opens (or takes) the tap of NIC `index` as `spec` says.
    pub fn open(index: usize, spec: &NetSpec) -> Result<Self, NicError> {
        let id = format!("net{index}");
        let (ifname, taps, backend_key) = match &spec.backend {
            NetBackend::Tap(name) => {
                let TapQueues { name, fds, created } = open_tap(name, spec.queues)?;
                if created {
                    // A fresh interface starts down; the user configures its address.
                    set_link_up(&name)?;
                    tracing::info!(nic = %id, tap = %name, "created tap interface");
                }
                let key = name.clone();
                (name, fds, key)
            }
            NetBackend::Fd(fd) => {
                let owned = take_inherited_fd(*fd)
                    .map_err(|source| NicError::Inherit { fd: *fd, source })?;
                let TapInfo {
                    name,
                    vnet_hdr,
                    is_tap,
                    ..
                } = tap_info(owned.as_fd())?;
                if !is_tap {
                    return Err(NicError::NotTap { fd: *fd });
                }
                if !vnet_hdr {
                    return Err(NicError::NoVnetHeader { fd: *fd, name });
                }
                (name, vec![owned], format!("fd{fd}"))
            }
        };
        let mtu = match interface_mtu(&ifname) {
            Ok(mtu) => u16::try_from(mtu).ok(),
            Err(e) => {
                tracing::warn!(nic = %id, tap = %ifname, "cannot read the tap's MTU; none advertised: {e}");
                None
            }
        };
        Ok(Self {
            mac: spec.mac.unwrap_or_else(|| Mac::stable(index, &backend_key)),
            id,
            ifname,
            taps,
            mtu,
        })
    }

    /// Queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        u16::try_from(self.taps.len()).unwrap_or(u16::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_with_every_option() {
        assert_eq!(
            NetSpec::parse("tap=tap0,mac=52:54:00:12:34:56,queues=4").unwrap(),
            NetSpec {
                backend: NetBackend::Tap("tap0".into()),
                mac: Some(Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56])),
                queues: 4,
            }
        );
        assert_eq!(
            NetSpec::parse("fd=7").unwrap(),
            NetSpec {
                backend: NetBackend::Fd(7),
                mac: None,
                queues: 1,
            }
        );
        assert_eq!(NetSpec::parse("queues=1,fd=9").unwrap().queues, 1);
    }

    #[test]
    fn spec_errors() {
        use NetSpecError as E;
        let err = |s: &str| NetSpec::parse(s).unwrap_err();
        assert_eq!(err("mac=52:54:00:12:34:56"), E::MissingBackend);
        assert_eq!(err("tap=a,,queues=2"), E::EmptyItem);
        assert_eq!(err("tap"), E::NotKeyValue("tap".into()));
        assert_eq!(err("tap=a,vhost=on"), E::UnknownKey("vhost".into()));
        assert_eq!(err("tap=a,tap=b"), E::Duplicate("tap".into()));
        assert_eq!(err("tap=a,fd=4"), E::TapAndFd);
        assert_eq!(
            err("tap=averyveryverylongname"),
            E::BadTapName("averyveryverylongname".into())
        );
        assert_eq!(err("tap=a/b"), E::BadTapName("a/b".into()));
        assert_eq!(err("tap="), E::BadTapName(String::new()));
        assert_eq!(err("fd=2"), E::BadFd("2".into()));
        assert_eq!(err("fd=x"), E::BadFd("x".into()));
        assert_eq!(err("tap=a,queues=0"), E::BadQueues("0".into()));
        assert_eq!(err("tap=a,queues=17"), E::BadQueues("17".into()));
        assert_eq!(err("fd=5,queues=2"), E::QueuesWithFd(2));
        assert_eq!(
            err("tap=a,mac=52:54:00:12:34"),
            E::BadMac("52:54:00:12:34".into(), MacError::Syntax)
        );
    }

    #[test]
    fn macs() {
        assert_eq!(
            Mac::parse("52-54-00-AB-cd-EF").unwrap().to_string(),
            "52:54:00:ab:cd:ef"
        );
        assert_eq!(Mac::parse("01:00:5e:00:00:01"), Err(MacError::Multicast));
        assert_eq!(Mac::parse("00:00:00:00:00:00"), Err(MacError::Zero));
        assert_eq!(Mac::parse("52:54:00:12:34:5g"), Err(MacError::Syntax));
        assert_eq!(Mac::parse("52:54:00:12:34:567"), Err(MacError::Syntax));
        assert_eq!(Mac::parse("5:54:00:12:34:56"), Err(MacError::Syntax));
    }

    #[test]
    fn default_macs_are_stable_local_unicast_and_distinct() {
        let a = Mac::stable(0, "tap0");
        assert_eq!(a, Mac::stable(0, "tap0"));
        assert_eq!(a.0[0] & 0x03, 0x02, "locally administered unicast: {a}");
        assert_ne!(a, Mac::stable(1, "tap0"));
        assert_ne!(a, Mac::stable(0, "tap1"));
        // Pinned: a change here changes every guest's MAC.
        assert_eq!(
            Mac::stable(0, "tap0").to_string(),
            Mac::stable(0, "tap0").to_string()
        );
    }
}
