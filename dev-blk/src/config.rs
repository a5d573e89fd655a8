//! What the device offers: virtio feature bits, vhost-user protocol features, and the
//! `struct virtio_blk_config` bytes the frontend reads with `GET_CONFIG`.

#![forbid(unsafe_code)]

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Bytes per virtio-blk sector (the unit of `sector`, `capacity` and the discard fields).
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the `GET_ID` string.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Largest queue the frontend may configure (`SET_VRING_NUM`).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Most queues a device may have (one worker thread each).
pub const MAX_QUEUES: u16 = 64;
/// Largest data payload of one IN/OUT request. Linux sends at most `max_sectors_kb` (1280 KiB by
/// default); anything beyond this limit is refused with `VIRTIO_BLK_S_IOERR`.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;
/// Limit on sectors per discard / write-zeroes segment (advertised in the config space).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Limit on segments per discard / write-zeroes request (advertised in the config space).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Bit 30: `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Size of the config structure we serve (up to and including the zoned fields, all zero).
pub const CONFIG_SIZE: usize = 96;

/// Everything the guest can learn about the disk, fixed for the life of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskGeometry {
    /// Size in 512-byte sectors (the image size rounded down).
    pub capacity_sectors: u64,
    /// Writes, discards and write-zeroes are refused.
    pub readonly: bool,
    /// The `GET_ID` answer, NUL-padded.
    pub serial: [u8; ID_BYTES],
    /// Number of request queues.
    pub num_queues: u16,
    /// Maximum queue size (the frontend chooses the actual size up to this).
    pub queue_size: u16,
    /// Physical block size of the backing storage in bytes (a power of two, >= 512).
    pub physical_block_size: u32,
}

impl DiskGeometry {
    /// Maximum data segments per request: queue size minus header and status descriptors.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// The virtio feature bits offered to the driver.
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VHOST_USER_F_PROTOCOL_FEATURES,
        ]
        .iter()
        .fold(0u64, |acc, &b| acc | (1u64 << b));
        if self.readonly {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        bits
    }

    /// `struct virtio_blk_config` (virtio 1.2 §5.2.4), little-endian, `CONFIG_SIZE` bytes.
    pub fn config_space(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let put = |c: &mut [u8; CONFIG_SIZE], off: usize, bytes: &[u8]| {
            c[off..off + bytes.len()].copy_from_slice(bytes);
        };
        let logical = u32::try_from(SECTOR_SIZE).unwrap_or(512);
        let physical = self.physical_block_size.max(logical);
        let per_physical = physical / logical;
        // physical_block_exp: log2(physical / logical).
        let exp = u8::try_from(per_physical.trailing_zeros()).unwrap_or(0);
        let min_io = u16::try_from(per_physical).unwrap_or(u16::MAX);

        put(&mut c, 0, &self.capacity_sectors.to_le_bytes()); // capacity
        // 8: size_max (VIRTIO_BLK_F_SIZE_MAX not offered) stays 0.
        put(&mut c, 12, &self.seg_max().to_le_bytes()); // seg_max
        // 16: geometry (not offered) stays 0.
        put(&mut c, 20, &logical.to_le_bytes()); // blk_size
        c[24] = exp; // topology: physical_block_exp
        c[25] = 0; // alignment_offset
        put(&mut c, 26, &min_io.to_le_bytes()); // min_io_size (logical blocks)
        put(&mut c, 28, &0u32.to_le_bytes()); // opt_io_size
        // 32: writeback (CONFIG_WCE not offered; FLUSH implies write-back caching).
        put(&mut c, 34, &self.num_queues.to_le_bytes()); // num_queues
        if !self.readonly {
            put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
            put(&mut c, 40, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_discard_seg
            put(&mut c, 44, &per_physical.to_le_bytes()); // discard_sector_alignment
            put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
            put(&mut c, 52, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
            c[56] = 1; // write_zeroes_may_unmap
        }
        c
    }

    /// The bytes `[offset, offset + size)` of the config space, or `None` when the range is
    /// not inside it (the vhost-user handler turns an empty answer into an error reply).
    pub fn config_slice(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        if size == 0 || end > CONFIG_SIZE {
            return None;
        }
        Some(self.config_space()[start..end].to_vec())
    }
}

/// Builds the `GET_ID` answer from a user string: at most 20 bytes, NUL-padded.
pub fn serial_from_str(s: &str) -> Option<[u8; ID_BYTES]> {
    let bytes = s.as_bytes();
    if bytes.len() > ID_BYTES {
        return None;
    }
    let mut id = [0u8; ID_BYTES];
    id[..bytes.len()].copy_from_slice(bytes);
    Some(id)
}

/// The default `GET_ID` answer: 8 hex digits of the device number and 12 of the inode, so it
/// is stable across restarts of the backend for the same image.
pub fn serial_from_identity(dev: u64, ino: u64) -> [u8; ID_BYTES] {
    let s = format!("{:08x}{:012x}", dev & 0xffff_ffff, ino & 0xffff_ffff_ffff);
    let mut id = [0u8; ID_BYTES];
    id.copy_from_slice(&s.as_bytes()[..ID_BYTES]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(readonly: bool) -> DiskGeometry {
        DiskGeometry {
            capacity_sectors: 0x1234_5678_9abc,
            readonly,
            serial: [0; ID_BYTES],
            num_queues: 3,
            queue_size: 256,
            physical_block_size: 4096,
        }
    }

    #[test]
    fn config_layout_matches_the_spec_offsets() {
        let c = geometry(false).config_space();
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            0x1234_5678_9abc
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24], 3, "4096 / 512 = 2^3");
        assert_eq!(u16::from_le_bytes(c[26..28].try_into().unwrap()), 8);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
        assert_eq!(
            u32::from_le_bytes(c[36..40].try_into().unwrap()),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap()),
            MAX_DISCARD_SEGMENTS
        );
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(
            u32::from_le_bytes(c[48..52].try_into().unwrap()),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(c[56], 1);
    }

    #[test]
    fn readonly_offers_ro_and_no_discard() {
        let g = geometry(true);
        let f = g.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(g.config_space()[36..60], [0u8; 24]);
        let rw = geometry(false).features();
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        for bit in [32, 2, 6, 9, 10, 12, 13, 14, 28, 29, 30] {
            assert_ne!(rw & (1u64 << bit), 0, "feature bit {bit}");
        }
    }

    #[test]
    fn config_slice_bounds() {
        let g = geometry(false);
        assert_eq!(g.config_slice(0, 60).unwrap().len(), 60);
        assert_eq!(g.config_slice(20, 4).unwrap(), 512u32.to_le_bytes());
        assert!(g.config_slice(0, 0).is_none());
        assert!(g.config_slice(90, 10).is_none());
        assert!(g.config_slice(u32::MAX, 2).is_none());
    }

    #[test]
    fn serials() {
        assert_eq!(&serial_from_str("disk0").unwrap()[..6], b"disk0\0");
        assert!(serial_from_str("123456789012345678901").is_none());
        assert!(serial_from_str("12345678901234567890").is_some());
        let id = serial_from_identity(0x803, 0x1234);
        assert_eq!(&id, b"00000803000000001234");
    }
}
