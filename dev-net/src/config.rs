//! What the device offers: virtio feature bits (offloads only where the tap takes them), the
//! `struct virtio_net_config` bytes served with `GET_CONFIG`, MAC addresses, and the mapping
//! from the guest's receive offloads to the tap's `TUN_F_*` flags.

#![forbid(unsafe_code)]

use std::fmt;

use ipc::tap::{
    TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO, TUN_F_USO4, TUN_F_USO6,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_USO4,
    VIRTIO_NET_F_GUEST_USO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Largest queue the frontend may configure (`SET_VRING_NUM`).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Most queue pairs (one worker thread and one tap queue each). The tap allows 256 queues;
/// the virtio-pci transport of the core allows 127 pairs.
pub const MAX_QUEUE_PAIRS: u16 = 127;
/// Bit 30: `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Size of `struct virtio_net_config` (virtio 1.2 §5.1.4, up to `supported_hash_types`).
pub const CONFIG_SIZE: usize = 24;
/// Smallest MTU the device may advertise (virtio 1.2 §5.1.4.1: at least 68).
pub const MIN_MTU: u16 = 68;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// `true` when feature bit `b` is set in `features`.
pub fn has(features: u64, b: u32) -> bool {
    features & bit(b) != 0
}

/// Guest receive offloads and the `TUN_F_*` flag each needs from the tap.
const GUEST_OFFLOADS: [(u32, u32); 5] = [
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
];

/// Device transmit offloads (the guest hands frames that still need the work) and the
/// `TUN_F_*` flag whose acceptance shows the kernel knows that kind of frame.
const HOST_OFFLOADS: [(u32, u32); 5] = [
    (VIRTIO_NET_F_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_HOST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_HOST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_HOST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_HOST_UFO, TUN_F_UFO),
];

/// Everything the guest can learn about the NIC, fixed for the life of the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetParams {
    /// Queue pairs (`2 * pairs` vhost-user queues: rx0, tx0, rx1, tx1, ...).
    pub pairs: u16,
    pub mac: MacAddr,
    /// The MTU to advertise (`VIRTIO_NET_F_MTU`), when known.
    pub mtu: Option<u16>,
    /// `TUN_F_*` flags the tap accepted (`ipc::tap::probe_offloads`).
    pub tap_offloads: u32,
}

impl NetParams {
    /// The virtio feature bits offered to the driver.
    pub fn features(&self) -> u64 {
        let mut f = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MQ,
            VHOST_USER_F_PROTOCOL_FEATURES,
        ]
        .iter()
        .fold(0u64, |acc, &b| acc | bit(b));
        if self.mtu.is_some() {
            f |= bit(VIRTIO_NET_F_MTU);
        }
        // Every offload rests on checksum offload (virtio 1.2 §5.1.3.1).
        if self.tap_offloads & TUN_F_CSUM != 0 {
            for (guest, tun) in GUEST_OFFLOADS {
                if self.tap_offloads & tun == tun {
                    f |= bit(guest);
                }
            }
            for (host, tun) in HOST_OFFLOADS {
                if self.tap_offloads & tun == tun {
                    f |= bit(host);
                }
            }
            let uso = TUN_F_USO4 | TUN_F_USO6;
            if self.tap_offloads & uso == uso {
                f |= bit(VIRTIO_NET_F_GUEST_USO4)
                    | bit(VIRTIO_NET_F_GUEST_USO6)
                    | bit(VIRTIO_NET_F_HOST_USO);
            }
        }
        f
    }

    /// `struct virtio_net_config`, little-endian: MAC, status = LINK_UP, max_virtqueue_pairs,
    /// MTU (0 when not offered), speed and duplex unknown, no RSS.
    pub fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..6].copy_from_slice(&self.mac.0);
        let link_up = u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1);
        c[6..8].copy_from_slice(&link_up.to_le_bytes());
        c[8..10].copy_from_slice(&self.pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        // speed: SPEED_UNKNOWN (-1); duplex: DUPLEX_UNKNOWN (0xff).
        c[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        c[16] = 0xff;
        c
    }

    /// The bytes `[offset, offset + size)` of the config space, or `None` when the range is
    /// empty or not inside it (the vhost-user handler turns an empty answer into an error).
    pub fn config_slice(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        if size == 0 || end > CONFIG_SIZE {
            return None;
        }
        Some(self.config_space()[start..end].to_vec())
    }
}

/// The `TUN_F_*` flags to set on the tap for the features the guest acked: the receive
/// offloads it can take (partially checksummed frames, TSO/UFO/USO super-frames), limited to
/// what the tap accepts (`tap_offloads`). USO needs both USO4 and USO6 (the tap takes them
/// only together); ECN needs a TSO flag.
pub fn tun_offloads(acked: u64, tap_offloads: u32) -> u32 {
    if !has(acked, VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = 0;
    for (guest, tun) in GUEST_OFFLOADS {
        if has(acked, guest) {
            flags |= tun;
        }
    }
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) == 0 {
        flags &= !TUN_F_TSO_ECN;
    }
    if has(acked, VIRTIO_NET_F_GUEST_USO4) && has(acked, VIRTIO_NET_F_GUEST_USO6) {
        flags |= TUN_F_USO4 | TUN_F_USO6;
    }
    let accepted = flags & tap_offloads;
    // The tap refuses a lone USO flag.
    if accepted & (TUN_F_USO4 | TUN_F_USO6) != TUN_F_USO4 | TUN_F_USO6 {
        return accepted & !(TUN_F_USO4 | TUN_F_USO6);
    }
    accepted
}

/// Length of the virtio-net header for the acked features: 12 bytes
/// (`virtio_net_hdr_v1`, with `num_buffers`) with VERSION_1 or MRG_RXBUF, else the legacy 10.
pub fn header_len(acked: u64) -> usize {
    if has(acked, VIRTIO_F_VERSION_1) || has(acked, VIRTIO_NET_F_MRG_RXBUF) {
        12
    } else {
        10
    }
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

/// Why a MAC address was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("MAC address {0:?} is not six colon-separated hex bytes")]
    Syntax(String),
    #[error("MAC address {0} is a multicast address (low bit of the first byte set)")]
    Multicast(MacAddr),
    #[error("MAC address {0} is all zeros")]
    Zero(MacAddr),
}

impl MacAddr {
    /// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast and all-zero addresses.
    pub fn parse(s: &str) -> Result<Self, MacError> {
        let syntax = || MacError::Syntax(s.to_owned());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let p = parts.next().ok_or_else(syntax)?;
            if p.len() != 2 {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        let mac = Self(mac);
        if mac.0[0] & 1 != 0 {
            return Err(MacError::Multicast(mac));
        }
        if mac.0 == [0; 6] {
            return Err(MacError::Zero(mac));
        }
        Ok(mac)
    }

    /// A stable, locally administered unicast address derived from `seed` (the tap name), in
    /// QEMU's 52:54:00 range, so a restarted backend offers the same address.
    pub fn derived(seed: &str) -> Self {
        // FNV-1a: a tiny, stable hash (std's hashers are randomly seeded).
        let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let b = h.to_le_bytes();
        Self([0x52, 0x54, 0x00, b[0], b[1], b[2]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_TAP: u32 =
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO | TUN_F_USO4 | TUN_F_USO6;

    fn params(tap_offloads: u32, mtu: Option<u16>) -> NetParams {
        NetParams {
            pairs: 2,
            mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            mtu,
            tap_offloads,
        }
    }

    #[test]
    fn offloads_are_offered_only_where_the_tap_takes_them() {
        let base = [32, 29, 28, 15, 5, 16, 22, 30];
        let none = params(0, None).features();
        for b in base {
            assert!(has(none, b), "bit {b}");
        }
        assert_eq!(none.count_ones(), 8, "{none:#x}");
        let all = params(ALL_TAP, Some(1500)).features();
        for b in [0, 1, 3, 7, 8, 9, 10, 11, 12, 13, 14, 54, 55, 56] {
            assert!(has(all, b), "bit {b}");
        }
        assert_eq!(all.count_ones(), 8 + 14);
        // TSO4 only; USO4 without USO6 is not USO.
        let some = params(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_USO4, None).features();
        for b in [0, 1, 7, 11] {
            assert!(has(some, b), "bit {b}");
        }
        for b in [3, 8, 9, 10, 12, 13, 14, 54, 55, 56] {
            assert!(!has(some, b), "bit {b}");
        }
        // Nothing without checksum offload.
        assert_eq!(params(TUN_F_TSO4 | TUN_F_TSO6, None).features(), none);
    }

    #[test]
    fn guest_features_map_to_tun_flags() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |a, &b| a | bit(b));
        assert_eq!(tun_offloads(0, ALL_TAP), 0);
        assert_eq!(
            tun_offloads(f(&[VIRTIO_NET_F_GUEST_TSO4]), ALL_TAP),
            0,
            "no TSO without GUEST_CSUM"
        );
        assert_eq!(tun_offloads(f(&[1]), ALL_TAP), TUN_F_CSUM);
        assert_eq!(
            tun_offloads(f(&[1, 7, 8, 9, 10]), ALL_TAP),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
        );
        assert_eq!(
            tun_offloads(f(&[1, 9]), ALL_TAP),
            TUN_F_CSUM,
            "ECN needs TSO"
        );
        assert_eq!(tun_offloads(f(&[1, 54]), ALL_TAP), TUN_F_CSUM, "USO4 alone");
        assert_eq!(
            tun_offloads(f(&[1, 54, 55]), ALL_TAP),
            TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6
        );
        assert_eq!(
            tun_offloads(f(&[1, 7, 54, 55]), TUN_F_CSUM | TUN_F_USO4),
            TUN_F_CSUM,
            "limited to what the tap takes"
        );
    }

    #[test]
    fn config_space_layout() {
        let c = params(0, Some(9000)).config_space();
        assert_eq!(c[0..6], [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "LINK_UP");
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000);
        assert_eq!(c[12..16], [0xff; 4]);
        assert_eq!(c[16], 0xff);
        assert_eq!(c[17..], [0; 7]);
        let p = params(0, None);
        assert_eq!(p.config_slice(10, 2).unwrap(), [0, 0]);
        assert_eq!(p.config_slice(0, 24).unwrap().len(), 24);
        assert!(p.config_slice(0, 0).is_none());
        assert!(p.config_slice(20, 8).is_none());
        assert!(p.config_slice(u32::MAX, 2).is_none());
    }

    #[test]
    fn header_length_follows_version_1_and_mrg_rxbuf() {
        assert_eq!(header_len(bit(32)), 12);
        assert_eq!(header_len(bit(15)), 12);
        assert_eq!(header_len(0), 10);
    }

    #[test]
    fn mac_addresses() {
        let m = MacAddr::parse("52:54:00:ab:CD:0f").unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert_eq!(
                MacAddr::parse(bad),
                Err(MacError::Syntax(bad.into())),
                "{bad:?}"
            );
        }
        assert!(matches!(
            MacAddr::parse("01:00:5e:00:00:01"),
            Err(MacError::Multicast(_))
        ));
        assert!(matches!(
            MacAddr::parse("00:00:00:00:00:00"),
            Err(MacError::Zero(_))
        ));
        let a = MacAddr::derived("tap0");
        assert_eq!(a, MacAddr::derived("tap0"));
        assert_ne!(a, MacAddr::derived("tap1"));
        assert_eq!(a.0[..3], [0x52, 0x54, 0]);
    }
}
