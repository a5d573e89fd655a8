//! Per-queue counters and the kinds of dropped frames. A drop never stops a queue: the chain
//! is completed (a transmit chain with length 0, a receive buffer unused or with length 0), the
//! counter goes up, and the first drop of each kind on a queue is logged at WARN.

#![forbid(unsafe_code)]

use std::fmt;

/// Why a frame (or a chain) was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropKind {
    /// A chain the driver must not post (see [`crate::chain::ChainError`]).
    MalformedChain,
    /// A chain too short for the virtio-net header (or a frame shorter than an Ethernet
    /// header).
    Short,
    /// A transmitted frame larger than [`crate::worker::MAX_TX_FRAME`], or a received frame
    /// that does not fit the buffers the guest posted.
    Oversized,
    /// A transmitted header the device refuses (see [`crate::header::HeaderError`]).
    BadHeader,
    /// The tap refused the frame or failed.
    Tap,
}

impl DropKind {
    pub const ALL: [DropKind; 5] = [
        DropKind::MalformedChain,
        DropKind::Short,
        DropKind::Oversized,
        DropKind::BadHeader,
        DropKind::Tap,
    ];

    fn index(self) -> usize {
        match self {
            DropKind::MalformedChain => 0,
            DropKind::Short => 1,
            DropKind::Oversized => 2,
            DropKind::BadHeader => 3,
            DropKind::Tap => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DropKind::MalformedChain => "malformed chain",
            DropKind::Short => "short",
            DropKind::Oversized => "oversized",
            DropKind::BadHeader => "bad header",
            DropKind::Tap => "tap error",
        }
    }
}

/// Counters of one queue (receive or transmit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Frames delivered (to the guest, or to the tap).
    pub frames: u64,
    /// Their bytes, headers excluded.
    pub bytes: u64,
    /// Driver interrupts sent.
    pub notifications: u64,
    /// Drops by [`DropKind`].
    pub drops: [u64; 5],
    /// Which kinds were already logged at WARN (bit per kind).
    warned: u8,
}

impl QueueStats {
    /// Counts a drop of `kind`; returns `true` if it is the first of its kind (the caller logs
    /// it at WARN).
    pub fn drop_frame(&mut self, kind: DropKind) -> bool {
        let i = kind.index();
        self.drops[i] += 1;
        let mask = 1u8 << i;
        let first = self.warned & mask == 0;
        self.warned |= mask;
        first
    }

    pub fn drops_of(&self, kind: DropKind) -> u64 {
        self.drops[kind.index()]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    pub fn delivered(&mut self, bytes: usize) {
        self.frames += 1;
        self.bytes += u64::try_from(bytes).unwrap_or(u64::MAX);
    }
}

impl fmt::Display for QueueStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} frames, {} bytes, {} interrupts, dropped:",
            self.frames, self.bytes, self.notifications
        )?;
        for kind in DropKind::ALL {
            write!(f, " {} {}", self.drops_of(kind), kind.name())?;
            if kind != DropKind::Tap {
                f.write_str(",")?;
            }
        }
        Ok(())
    }
}

/// Counters of one queue pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairStats {
    pub rx: QueueStats,
    pub tx: QueueStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_drop_of_each_kind_is_reported_once() {
        let mut s = QueueStats::default();
        assert!(s.drop_frame(DropKind::Oversized));
        assert!(!s.drop_frame(DropKind::Oversized));
        assert!(s.drop_frame(DropKind::Tap));
        assert!(!s.drop_frame(DropKind::Oversized));
        assert_eq!(s.drops_of(DropKind::Oversized), 3);
        assert_eq!(s.drops_of(DropKind::Tap), 1);
        assert_eq!(s.drops_of(DropKind::Short), 0);
        assert_eq!(s.total_drops(), 4);
        s.delivered(1500);
        s.delivered(60);
        assert_eq!((s.frames, s.bytes), (2, 1560));
        assert_eq!(
            s.to_string(),
            "2 frames, 1560 bytes, 0 interrupts, dropped: 0 malformed chain, 0 short, \
             3 oversized, 0 bad header, 1 tap error"
        );
    }
}
