//! The virtio-net header that precedes every frame (virtio 1.2 §5.1.6): `flags`, `gso_type`,
//! `hdr_len`, `gso_size`, `csum_start`, `csum_offset` (10 bytes, `struct virtio_net_hdr`)
//! and, with VERSION_1 or MRG_RXBUF, `num_buffers` (12 bytes). The tap uses the same layout
//! (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ`), so frames pass between guest and tap with their header
//! unchanged, after validation on the way out.

#![forbid(unsafe_code)]

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
};

use crate::config::has;

/// Size of the largest header (`virtio_net_hdr_v1` / `virtio_net_hdr_mrg_rxbuf`).
pub const MAX_HEADER_LEN: usize = 12;
/// Offset of `num_buffers`.
pub const NUM_BUFFERS_OFFSET: usize = 10;

const NEEDS_CSUM: u8 = flag(VIRTIO_NET_HDR_F_NEEDS_CSUM);
const DATA_VALID: u8 = flag(VIRTIO_NET_HDR_F_DATA_VALID);
const GSO_ECN: u8 = flag(VIRTIO_NET_HDR_GSO_ECN);

/// The header's 8-bit constants.
const fn flag(v: u32) -> u8 {
    let b = v.to_le_bytes();
    b[0]
}

/// A decoded header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

/// Why a transmitted frame's header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("header flags {0:#x} have unknown bits")]
    UnknownFlags(u8),
    #[error("checksum offload asked but VIRTIO_NET_F_CSUM was not negotiated")]
    ChecksumNotNegotiated,
    #[error("checksum at {start}+{offset} is outside the {len}-byte frame")]
    ChecksumOutside { start: u16, offset: u16, len: usize },
    #[error("segmentation type {0:#x} is unknown")]
    UnknownGso(u8),
    #[error("segmentation type {0:#x} was not negotiated")]
    GsoNotNegotiated(u8),
    #[error("segmentation type {0:#x} with a segment size of 0")]
    ZeroGsoSize(u8),
    #[error("segmentation without checksum offload (NEEDS_CSUM)")]
    GsoWithoutChecksum,
}

impl NetHeader {
    /// Decodes the first `min(len, 12)` bytes of `b` (missing fields read as 0).
    pub fn parse(b: &[u8]) -> Self {
        let mut raw = [0u8; MAX_HEADER_LEN];
        let n = b.len().min(MAX_HEADER_LEN);
        raw[..n].copy_from_slice(&b[..n]);
        let u16_at = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
        Self {
            flags: raw[0],
            gso_type: raw[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// The 12-byte encoding (callers use the first 10 with a legacy header).
    pub fn to_bytes(self) -> [u8; MAX_HEADER_LEN] {
        let mut b = [0u8; MAX_HEADER_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Checks a header the driver wrote in front of a `frame_len`-byte frame against the
    /// negotiated `features`, and returns the header to hand to the tap: `num_buffers` and the
    /// receive-only `DATA_VALID` flag cleared. The kernel validates segmentation again; this
    /// catches what the driver may not send at all.
    pub fn validate_tx(self, frame_len: usize, features: u64) -> Result<Self, HeaderError> {
        if self.flags & !(NEEDS_CSUM | DATA_VALID) != 0 {
            return Err(HeaderError::UnknownFlags(self.flags));
        }
        let needs_csum = self.flags & NEEDS_CSUM != 0;
        if needs_csum {
            if !has(features, VIRTIO_NET_F_CSUM) {
                return Err(HeaderError::ChecksumNotNegotiated);
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(HeaderError::ChecksumOutside {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    len: frame_len,
                });
            }
        }
        let gso = self.gso_type & !GSO_ECN;
        let needed = match u32::from(gso) {
            VIRTIO_NET_HDR_GSO_NONE => None,
            VIRTIO_NET_HDR_GSO_TCPV4 => Some(VIRTIO_NET_F_HOST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => Some(VIRTIO_NET_F_HOST_TSO6),
            VIRTIO_NET_HDR_GSO_UDP => Some(VIRTIO_NET_F_HOST_UFO),
            VIRTIO_NET_HDR_GSO_UDP_L4 => Some(VIRTIO_NET_F_HOST_USO),
            _ => return Err(HeaderError::UnknownGso(self.gso_type)),
        };
        if let Some(feature) = needed {
            if !has(features, feature) {
                return Err(HeaderError::GsoNotNegotiated(self.gso_type));
            }
            if self.gso_size == 0 {
                return Err(HeaderError::ZeroGsoSize(self.gso_type));
            }
            if !needs_csum {
                return Err(HeaderError::GsoWithoutChecksum);
            }
        }
        if self.gso_type & GSO_ECN != 0
            && (needed.is_none() || !has(features, VIRTIO_NET_F_HOST_ECN))
        {
            return Err(HeaderError::GsoNotNegotiated(self.gso_type));
        }
        Ok(Self {
            flags: self.flags & NEEDS_CSUM,
            num_buffers: 0,
            ..self
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(bits: &[u32]) -> u64 {
        bits.iter().fold(0, |a, &b| a | (1u64 << b))
    }

    #[test]
    fn round_trip() {
        let h = NetHeader {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x1234,
            gso_size: 1448,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 4, 0x34, 0x12, 0xa8, 0x05, 54, 0, 16, 0, 3, 0]);
        assert_eq!(NetHeader::parse(&b), h);
        // A legacy 10-byte header has no num_buffers.
        assert_eq!(NetHeader::parse(&b[..10]).num_buffers, 0);
    }

    #[test]
    fn plain_frames_pass_and_are_sanitised() {
        let h = NetHeader {
            flags: DATA_VALID,
            num_buffers: 7,
            ..NetHeader::default()
        };
        assert_eq!(h.validate_tx(60, 0).unwrap(), NetHeader::default());
    }

    #[test]
    fn checksum_offload_needs_the_feature_and_a_field_inside_the_frame() {
        let h = NetHeader {
            flags: NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..NetHeader::default()
        };
        assert_eq!(
            h.validate_tx(100, 0),
            Err(HeaderError::ChecksumNotNegotiated)
        );
        let csum = features(&[VIRTIO_NET_F_CSUM]);
        assert_eq!(h.validate_tx(100, csum).unwrap(), h);
        assert_eq!(h.validate_tx(42, csum).unwrap(), h);
        assert_eq!(
            h.validate_tx(41, csum),
            Err(HeaderError::ChecksumOutside {
                start: 34,
                offset: 6,
                len: 41
            })
        );
        let bad = NetHeader {
            flags: 0x10,
            ..NetHeader::default()
        };
        assert_eq!(
            bad.validate_tx(60, csum),
            Err(HeaderError::UnknownFlags(0x10))
        );
    }

    #[test]
    fn segmentation_needs_its_feature() {
        let tso = NetHeader {
            flags: NEEDS_CSUM,
            gso_type: 1,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            ..NetHeader::default()
        };
        let csum = features(&[VIRTIO_NET_F_CSUM]);
        assert_eq!(
            tso.validate_tx(9000, csum),
            Err(HeaderError::GsoNotNegotiated(1))
        );
        let f = features(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]);
        assert_eq!(tso.validate_tx(9000, f).unwrap(), tso);
        let ecn = NetHeader {
            gso_type: 0x81,
            ..tso
        };
        assert_eq!(
            ecn.validate_tx(9000, f),
            Err(HeaderError::GsoNotNegotiated(0x81))
        );
        let f_ecn = f | features(&[VIRTIO_NET_F_HOST_ECN]);
        assert_eq!(ecn.validate_tx(9000, f_ecn).unwrap(), ecn);
        let zero = NetHeader { gso_size: 0, ..tso };
        assert_eq!(zero.validate_tx(9000, f), Err(HeaderError::ZeroGsoSize(1)));
        let no_csum = NetHeader { flags: 0, ..tso };
        assert_eq!(
            no_csum.validate_tx(9000, f),
            Err(HeaderError::GsoWithoutChecksum)
        );
        let unknown = NetHeader { gso_type: 2, ..tso };
        assert_eq!(
            unknown.validate_tx(9000, f),
            Err(HeaderError::UnknownGso(2))
        );
        let ecn_alone = NetHeader {
            gso_type: 0x80,
            ..NetHeader::default()
        };
        assert_eq!(
            ecn_alone.validate_tx(60, f_ecn),
            Err(HeaderError::GsoNotNegotiated(0x80))
        );
        for (gso, feature) in [
            (4u8, VIRTIO_NET_F_HOST_TSO6),
            (3, VIRTIO_NET_F_HOST_UFO),
            (5, VIRTIO_NET_F_HOST_USO),
        ] {
            let h = NetHeader {
                gso_type: gso,
                ..tso
            };
            assert_eq!(
                h.validate_tx(9000, csum),
                Err(HeaderError::GsoNotNegotiated(gso))
            );
            assert!(h.validate_tx(9000, csum | features(&[feature])).is_ok());
        }
    }
}
