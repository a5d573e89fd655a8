//! The transport's register model, driven as Linux's virtio_pci_modern driver does.

use super::*;
use crate::irq_routing::{MsiMessage, Route};
use crate::virtio::pci::{NO_VECTOR, TRANSPORT_FEATURE_MASK};
use crate::virtio::status;

const VERSION_1: u64 = 1 << 32;

/// A parsed `struct virtio_pci_cap`.
#[derive(Debug, PartialEq, Eq)]
struct VirtioCap {
    at: usize,
    cfg_type: u8,
    bar: u8,
    offset: u32,
    length: u32,
    len: u8,
}

/// Walks the capability list through config-space reads, as `pci_find_capability` and
/// `virtio_pci_find_capability` do.
fn parse_caps(dev: &mut impl Guest) -> (Vec<VirtioCap>, Option<usize>) {
    assert_ne!(dev.cfg_rd(0x06, 2) & 0x10, 0, "status: capability list");
    let mut at = usize::try_from(dev.cfg_rd(0x34, 1)).unwrap();
    let (mut caps, mut msix) = (Vec::new(), None);
    let mut guard = 0;
    while at != 0 {
        guard += 1;
        assert!(guard < 48, "capability list loops");
        assert_eq!(at % 4, 0);
        let id = dev.cfg_rd(at, 1);
        let next = usize::try_from(dev.cfg_rd(at + 1, 1)).unwrap();
        match id {
            0x09 => caps.push(VirtioCap {
                at,
                len: u8::try_from(dev.cfg_rd(at + 2, 1)).unwrap(),
                cfg_type: u8::try_from(dev.cfg_rd(at + 3, 1)).unwrap(),
                bar: u8::try_from(dev.cfg_rd(at + 4, 1)).unwrap(),
                offset: dev.cfg_rd(at + 8, 4),
                length: dev.cfg_rd(at + 12, 4),
            }),
            0x11 => msix = Some(at),
            other => panic!("unexpected capability {other:#x}"),
        }
        at = next;
    }
    (caps, msix)
}

#[test]
fn identity_and_bar0() {
    let (b, _) = fake(2);
    let mut r = rig(b);
    let d = &mut r.dev;
    assert_eq!(d.cfg_rd(0, 2), 0x1af4);
    assert_eq!(d.cfg_rd(2, 2), 0x1042);
    assert_eq!(d.cfg_rd(8, 1), 1, "revision 1: modern only");
    assert_eq!(d.cfg_rd(9, 3), 0x01_00_00, "class 0x0100");
    assert_eq!(d.cfg_rd(0x2c, 2), 0x1af4);
    assert_eq!(d.cfg_rd(0x2e, 2), 2, "subsystem id = virtio type");
    assert_eq!(d.cfg_rd(0x3d, 1), 0, "no INTx pin");
    // BAR0: 64-bit, non-prefetchable, 64 KiB.
    assert_eq!(d.cfg_rd(0x10, 4), 0xc000_0004);
    assert_eq!(d.cfg_rd(0x14, 4), 0);
    d.cfg_wr(0x10, 4, u32::MAX);
    d.cfg_wr(0x14, 4, u32::MAX);
    let size = u64::from(d.cfg_rd(0x10, 4) & !0xf) | (u64::from(d.cfg_rd(0x14, 4)) << 32);
    assert_eq!(!size + 1, 0x1_0000);
}

#[test]
fn capability_chain_parses_back() {
    let (b, _) = fake(3);
    let mut r = rig(b);
    let (caps, msix) = parse_caps(&mut r.dev);
    let find = |t: u8| caps.iter().find(|c| c.cfg_type == t).unwrap();
    let common = find(1);
    assert_eq!((common.bar, common.offset, common.len), (0, 0x0000, 16));
    assert!(
        common.length >= 56,
        "Linux requires sizeof(virtio_pci_common_cfg)"
    );
    let notify = find(2);
    assert_eq!((notify.offset, notify.len), (0x6000, 20));
    assert_eq!(r.dev.cfg_rd(notify.at + 16, 4), 4, "notify_off_multiplier");
    assert!(
        u64::from(notify.length) >= 3 * 4,
        "covers every queue's notify dword"
    );
    assert_eq!(find(3).offset, 0x2000);
    assert!(find(3).length >= 1);
    assert_eq!(find(4).offset, 0x4000);
    let pci_cfg = find(5);
    assert_eq!(pci_cfg.len, 20);
    for c in &caps {
        assert_eq!(c.bar, 0);
        assert!(u64::from(c.offset) + u64::from(c.length) <= 0x1_0000);
    }
    // MSI-X: num_queues + 1 vectors, table and PBA in BAR0.
    let m = msix.expect("MSI-X capability");
    assert_eq!(
        r.dev.cfg_rd(m + 2, 2) & 0x7ff,
        3,
        "table size N-1 = 3 queues"
    );
    assert_eq!(r.dev.cfg_rd(m + 4, 4), 0x8000);
    assert_eq!(r.dev.cfg_rd(m + 8, 4), 0x9000);
    // Capability bytes are read-only except MSI-X enable/mask and the PCI_CFG window.
    r.dev.cfg_wr(common.at + 8, 4, 0x1234);
    assert_eq!(r.dev.cfg_rd(common.at + 8, 4), 0);
    r.dev.cfg_wr(m + 2, 2, 0xffff);
    assert_eq!(r.dev.cfg_rd(m + 2, 2), 0xc003);
}

#[test]
fn feature_windows_and_negotiation() {
    let (b, calls) = fake(1);
    let mut r = rig(b);
    let d = &mut r.dev;
    let offered = BACKEND_FEATURES & TRANSPORT_FEATURE_MASK;
    assert_eq!(d.offered_features(), offered);
    for hidden in [30, 33, 34, 35, 38, 40] {
        assert_eq!(
            offered & (1 << hidden),
            0,
            "bit {hidden} must not be offered"
        );
    }
    d.wr(cc::DFSELECT, 4, 0);
    assert_eq!(d.rd(cc::DF, 4), offered & 0xffff_ffff);
    d.wr(cc::DFSELECT, 4, 1);
    assert_eq!(d.rd(cc::DF, 4), offered >> 32);
    d.wr(cc::DFSELECT, 4, 2);
    assert_eq!(d.rd(cc::DF, 4), 0);
    assert_eq!(d.rd(cc::DFSELECT, 4), 2);

    // An unknown bit makes FEATURES_OK not stick.
    d.wr(cc::STATUS, 1, 3);
    d.wr(cc::GFSELECT, 4, 1);
    d.wr(cc::GF, 4, (VERSION_1 | (1 << 34)) >> 32);
    d.wr(cc::STATUS, 1, 0xb);
    assert_eq!(d.rd(cc::STATUS, 1), 3, "FEATURES_OK refused");
    // No VERSION_1: refused too.
    d.wr(cc::STATUS, 1, 0);
    d.wr(cc::STATUS, 1, 3);
    d.wr(cc::GFSELECT, 4, 0);
    d.wr(cc::GF, 4, 1 << 9);
    d.wr(cc::STATUS, 1, 0xb);
    assert_eq!(d.rd(cc::STATUS, 1) & 0x8, 0);

    d.wr(cc::STATUS, 1, 0);
    let want = VERSION_1 | (1 << 9) | (1 << 29) | (1 << 34);
    assert_eq!(negotiate(d, want), 0xb);
    d.wr(cc::GFSELECT, 4, 1);
    assert_eq!(d.rd(cc::GF, 4), 1, "VERSION_1 acked, packed not");
    d.wr(cc::GFSELECT, 4, 0);
    assert_eq!(d.rd(cc::GF, 4), (1 << 9) | (1 << 29));
    // After FEATURES_OK the driver features are frozen.
    d.wr(cc::GF, 4, 0);
    assert_eq!(d.rd(cc::GF, 4), (1 << 9) | (1 << 29));
    d.wr(cc::STATUS, 1, 0xf);
    match &calls.lock().unwrap()[0] {
        Call::Activate { features, .. } => {
            assert_eq!(*features, VERSION_1 | (1 << 9) | (1 << 29));
        }
        other => panic!("expected activation, got {other:?}"),
    }
}

#[test]
fn queue_registers() {
    let (b, _) = fake(2);
    let mut r = rig(b);
    let d = &mut r.dev;
    assert_eq!(d.rd(cc::NUMQ, 2), 2);
    d.wr(cc::NUMQ, 2, 9);
    assert_eq!(d.rd(cc::NUMQ, 2), 2, "read-only");
    d.wr(cc::Q_SELECT, 2, 1);
    assert_eq!(d.rd(cc::Q_SIZE, 2), 256, "reset value is the maximum");
    assert_eq!(d.rd(cc::Q_NOFF, 2), 1, "notify offset = queue index");
    assert_eq!(d.rd(cc::Q_ENABLE, 2), 0);
    assert_eq!(d.rd(cc::Q_MSIX, 2), u64::from(NO_VECTOR));
    for bad in [0, 512, 100] {
        d.wr(cc::Q_SIZE, 2, bad);
        assert_eq!(d.rd(cc::Q_SIZE, 2), 256, "size {bad} refused");
    }
    d.wr(cc::Q_SIZE, 2, 64);
    assert_eq!(d.rd(cc::Q_SIZE, 2), 64);
    // Vectors: 0..=2 exist (2 queues + config); anything else reads back NO_VECTOR.
    d.wr(cc::Q_MSIX, 2, 2);
    assert_eq!(d.rd(cc::Q_MSIX, 2), 2);
    d.wr(cc::Q_MSIX, 2, 3);
    assert_eq!(d.rd(cc::Q_MSIX, 2), u64::from(NO_VECTOR));
    d.wr(cc::MSIX, 2, 0);
    assert_eq!(d.rd(cc::MSIX, 2), 0);
    d.wr(cc::MSIX, 2, 7);
    assert_eq!(d.rd(cc::MSIX, 2), u64::from(NO_VECTOR));
    // Ring addresses: two dwords or one qword.
    d.wr(cc::Q_DESCLO, 4, 0x1000);
    d.wr(cc::Q_DESCHI, 4, 0x2);
    assert_eq!(d.rd(cc::Q_DESCLO, 8), 0x2_0000_1000);
    d.wr(cc::Q_AVAILLO, 8, 0x3_0000_2000);
    assert_eq!(d.rd(cc::Q_AVAILLO, 4), 0x2000);
    assert_eq!(d.rd(cc::Q_AVAILLO + 4, 4), 3);
    d.wr(cc::Q_ENABLE, 2, 1);
    assert_eq!(d.rd(cc::Q_ENABLE, 2), 1);
    // Queue 0 kept its own values.
    d.wr(cc::Q_SELECT, 2, 0);
    assert_eq!(d.rd(cc::Q_SIZE, 2), 256);
    assert_eq!(d.rd(cc::Q_ENABLE, 2), 0);
    assert_eq!(d.rd(cc::Q_DESCLO, 8), 0);
    // A queue that does not exist reads size 0 and ignores writes.
    d.wr(cc::Q_SELECT, 2, 2);
    assert_eq!(d.rd(cc::Q_SIZE, 2), 0);
    d.wr(cc::Q_SIZE, 2, 16);
    assert_eq!(d.rd(cc::Q_SIZE, 2), 0);
    // One dword write at 0x14 sets status and selects a queue.
    d.wr(cc::STATUS, 4, 0x0001_0001);
    assert_eq!(d.rd(cc::STATUS, 1), 1);
    assert_eq!(d.rd(cc::Q_SELECT, 2), 1);
    assert_eq!(d.rd(cc::CFGGEN, 1), 0);
    // The fields after the 1.0 layout read 0.
    assert_eq!(d.rd(0x38, 8), 0);
}

#[test]
fn driver_ok_hands_enabled_queues_and_their_vectors_to_the_backend() {
    let (b, calls) = fake(3);
    let mut r = rig(b);
    let d = &mut r.dev;
    assert_eq!(negotiate(d, u64::MAX), 0xb);
    d.wr(cc::MSIX, 2, 0);
    assert_eq!(setup_queue(d, 0, 128, 0x10_0000, 1), 1);
    assert_eq!(setup_queue(d, 2, 256, 0x20_0000, NO_VECTOR), NO_VECTOR);
    // Queue 1 is never enabled (Linux uses fewer queues than offered on small guests).
    d.wr(cc::STATUS, 1, 0xf);
    assert!(d.is_active());
    assert_eq!(d.rd(cc::STATUS, 1), 0xf);
    let calls = calls.lock().unwrap().clone();
    let Call::Activate {
        queues,
        kicks,
        calls: call_fds,
        ..
    } = &calls[0]
    else {
        panic!("expected activation, got {calls:?}");
    };
    assert_eq!(
        queues,
        &vec![
            QueueConfig {
                index: 0,
                size: 128,
                desc: 0x10_0000,
                avail: 0x10_1000,
                used: 0x10_2000
            },
            QueueConfig {
                index: 2,
                size: 256,
                desc: 0x20_0000,
                avail: 0x20_1000,
                used: 0x20_2000
            }
        ]
    );
    assert_eq!(kicks[0], d.kick_eventfd(0).unwrap().as_raw_fd());
    assert_eq!(kicks[1], d.kick_eventfd(2).unwrap().as_raw_fd());
    assert_eq!(call_fds[0], d.vector(1).unwrap().0.as_raw_fd());
    let vector_fds: Vec<_> = (0..4).map(|v| d.vector(v).unwrap().0.as_raw_fd()).collect();
    assert!(
        !vector_fds.contains(&call_fds[1]),
        "a queue without a vector gets an eventfd no irqfd reads"
    );
    // Queue registers are frozen after DRIVER_OK; re-writing DRIVER_OK does not re-activate.
    d.wr(cc::Q_SELECT, 2, 0);
    d.wr(cc::Q_SIZE, 2, 16);
    assert_eq!(d.rd(cc::Q_SIZE, 2), 128);
    d.wr(cc::STATUS, 1, 0xf);
    assert_eq!(calls.len(), 1);
}

#[test]
fn reset_stops_the_backend_and_restores_reset_values() {
    let (b, calls) = fake(1);
    let mut r = rig(b);
    let d = &mut r.dev;
    // A reset before DRIVER_OK (Linux's probe starts with one) does not touch the backend.
    d.wr(cc::STATUS, 1, 0);
    assert!(calls.lock().unwrap().is_empty());

    enable_msix(d, &[(0, 0xfee0_0000, 0x30), (1, 0xfee0_0000, 0x31)]);
    negotiate(d, u64::MAX);
    d.wr(cc::MSIX, 2, 0);
    setup_queue(d, 0, 64, 0x10_0000, 1);
    d.wr(cc::STATUS, 1, 0xf);
    d.wr(cc::STATUS, 1, 0);
    assert_eq!(
        d.rd(cc::STATUS, 1),
        0,
        "reset completes before the write returns"
    );
    assert!(!d.is_active());
    assert_eq!(calls.lock().unwrap().last(), Some(&Call::Reset));
    assert_eq!(d.rd(cc::MSIX, 2), u64::from(NO_VECTOR));
    d.wr(cc::GFSELECT, 4, 1);
    assert_eq!(d.rd(cc::GF, 4), 0);
    assert_eq!(d.rd(cc::GFSELECT, 4), 1);
    d.wr(cc::Q_SELECT, 2, 0);
    assert_eq!(d.rd(cc::Q_SIZE, 2), 256);
    assert_eq!(d.rd(cc::Q_ENABLE, 2), 0);
    assert_eq!(d.rd(cc::Q_MSIX, 2), u64::from(NO_VECTOR));
    assert_eq!(d.rd(cc::Q_DESCLO, 8), 0);
    // MSI-X is PCI state, not virtio state: the vectors stay programmed and routed.
    assert_eq!(d.rd(0x8000 + 16 + 8, 4), 0x31);
    assert_eq!(r.vm.irqfds.lock().unwrap().len(), 2);
    // A second reset does not stop the backend again; a second activation works.
    d.wr(cc::STATUS, 1, 0);
    assert_eq!(calls.lock().unwrap().len(), 2);
    negotiate(d, u64::MAX);
    setup_queue(d, 0, 64, 0x10_0000, 1);
    d.wr(cc::STATUS, 1, 0xf);
    assert!(matches!(calls.lock().unwrap()[2], Call::Activate { .. }));
}

#[test]
fn failed_activation_sets_needs_reset_and_raises_the_config_interrupt() {
    let (mut b, calls) = fake(1);
    b.refuse_activate = true;
    let mut r = rig(b);
    let d = &mut r.dev;
    enable_msix(d, &[(0, 0xfee0_0000, 0x30)]);
    negotiate(d, u64::MAX);
    d.wr(cc::MSIX, 2, 0);
    setup_queue(d, 0, 64, 0x10_0000, NO_VECTOR);
    let generation = d.rd(cc::CFGGEN, 1);
    d.wr(cc::STATUS, 1, 0xf);
    assert_eq!(
        d.rd(cc::STATUS, 1),
        u64::from(0xf | status::DEVICE_NEEDS_RESET)
    );
    assert!(!d.is_active());
    assert_ne!(d.rd(cc::CFGGEN, 1), generation);
    assert_eq!(
        d.vector(0).unwrap().0.read().unwrap(),
        1,
        "config vector fired"
    );
    // The driver's status writes keep the bit; reset clears it and stops the backend.
    d.wr(cc::STATUS, 1, 0xf);
    assert_ne!(d.rd(cc::STATUS, 1) & 0x40, 0);
    d.wr(cc::STATUS, 1, 0);
    assert_eq!(d.rd(cc::STATUS, 1), 0);
    assert_eq!(calls.lock().unwrap().last(), Some(&Call::Reset));
    // DRIVER_OK without FEATURES_OK never reaches the backend.
    d.wr(cc::STATUS, 1, 0x7);
    assert_ne!(d.rd(cc::STATUS, 1) & 0x40, 0);
    assert_eq!(calls.lock().unwrap().len(), 2);
}

#[test]
fn msix_vectors_become_routed_irqfds() {
    let (b, _) = fake(1);
    let mut r = rig(b);
    let (gsi0, gsi1) = (r.dev.vector(0).unwrap().1, r.dev.vector(1).unwrap().1);
    let (fd0, fd1) = (
        r.dev.vector(0).unwrap().0.as_raw_fd(),
        r.dev.vector(1).unwrap().0.as_raw_fd(),
    );
    assert_ne!(gsi0, gsi1);
    assert!(gsi0 >= crate::layout::irq::MSI_GSI_START);
    let cap = r
        .dev
        .config()
        .capabilities()
        .into_iter()
        .find(|&(_, id)| id == 0x11)
        .unwrap()
        .0;
    let irqfds = |r: &Rig<FakeBackend>| r.vm.irqfds.lock().unwrap().clone();
    // Programming an entry while MSI-X is off routes nothing.
    r.dev.wr(0x8000 + 16, 8, 0xfee0_1000);
    r.dev.wr(0x8000 + 16 + 8, 4, 0x41);
    r.dev.wr(0x8000 + 16 + 12, 4, 0);
    assert!(irqfds(&r).is_empty());
    // Enable with the function masked, then unmask the function: vector 1 goes live.
    r.dev.cfg_wr(cap + 2, 2, 0xc000);
    assert!(irqfds(&r).is_empty());
    r.dev.cfg_wr(cap + 2, 2, 0x8000);
    assert_eq!(irqfds(&r), vec![(fd1, gsi1)]);
    let msg = MsiMessage {
        address: 0xfee0_1000,
        data: 0x41,
    };
    assert!(r.router.routes().contains(&Route::Msi { gsi: gsi1, msg }));
    let sent = r.table.sent.lock().unwrap().len();
    assert!(sent >= 1);
    // Rewriting the entry (mask, write, unmask as Linux does) updates the route.
    r.dev.wr(0x8000 + 16 + 12, 4, 1);
    assert!(irqfds(&r).is_empty(), "masked vector: irqfd removed");
    r.dev.wr(0x8000 + 16 + 8, 4, 0x42);
    r.dev.wr(0x8000 + 16 + 12, 4, 0);
    assert_eq!(irqfds(&r), vec![(fd1, gsi1)]);
    let last = r.table.sent.lock().unwrap().last().unwrap().clone();
    assert!(last.contains(&Route::Msi {
        gsi: gsi1,
        msg: MsiMessage { data: 0x42, ..msg }
    }));
    assert_eq!(&last[..40], &crate::irq_routing::default_routes()[..]);
    // Vector 0 joins; the function mask takes both down; disabling MSI-X keeps them down.
    r.dev.wr(0x8000, 8, 0xfee0_0000);
    r.dev.wr(0x8000 + 8, 4, 0x40);
    r.dev.wr(0x8000 + 12, 4, 0);
    assert_eq!(irqfds(&r).len(), 2);
    assert!(irqfds(&r).contains(&(fd0, gsi0)));
    r.dev.cfg_wr(cap + 3, 1, 0xc0);
    assert!(irqfds(&r).is_empty());
    r.dev.cfg_wr(cap + 3, 1, 0x80);
    assert_eq!(irqfds(&r).len(), 2);
    r.dev.cfg_wr(cap + 3, 1, 0x00);
    assert!(irqfds(&r).is_empty());
}

#[test]
fn pba_reports_signals_held_back_by_masks() {
    let (b, _) = fake(1);
    let mut r = rig(b);
    let d = &mut r.dev;
    enable_msix(d, &[(0, 0xfee0_0000, 0x40)]);
    // Vector 1 stays masked; a backend call on it is pending, not lost.
    d.vector(1).unwrap().0.write(1).unwrap();
    assert_eq!(d.rd(0x9000, 8), 0b10);
    assert_eq!(
        d.rd(0x9000, 8),
        0b10,
        "reading the PBA does not consume the signal"
    );
    // Active vectors report nothing pending (KVM consumes their eventfds).
    d.vector(0).unwrap().0.write(1).unwrap();
    assert_eq!(d.rd(0x9000, 8), 0b10);
    // Unmasking hands the eventfd, still signalled, to KVM (which injects it at once).
    d.wr(0x8000 + 16 + 12, 4, 0);
    assert_eq!(d.rd(0x9000, 8), 0);
    assert_eq!(d.vector(1).unwrap().0.read().unwrap(), 1);
}

#[test]
fn notifies_are_ioeventfds_that_follow_bar_moves() {
    let (b, _) = fake(2);
    let mut r = rig(b);
    let fds: Vec<_> = (0..2)
        .map(|q| r.dev.kick_eventfd(q).unwrap().as_raw_fd())
        .collect();
    let mut got = r.vm.ioevents.lock().unwrap().clone();
    got.sort_unstable();
    let mut want = vec![(fds[0], BAR + 0x6000), (fds[1], BAR + 0x6004)];
    want.sort_unstable();
    assert_eq!(got, want);
    // The root moves the bus mapping, then tells the device.
    r.dev.config_mut().set_bar_addr(0, 0xd000_0000).unwrap();
    r.dev.bar_moved(0, BAR, 0xd000_0000);
    let mut got = r.vm.ioevents.lock().unwrap().clone();
    got.sort_unstable();
    let mut want = vec![(fds[0], 0xd000_6000), (fds[1], 0xd000_6004)];
    want.sort_unstable();
    assert_eq!(got, want);
    // A notify that reaches the device (PCI_CFG window, no ioeventfd) still kicks.
    r.dev.wr(0x6004, 2, 1);
    assert_eq!(r.dev.kick_eventfd(1).unwrap().read().unwrap(), 1);
    assert!(r.dev.kick_eventfd(0).unwrap().read().is_err());
}

#[test]
fn device_config_is_served_from_the_backend_and_writes_go_to_it() {
    let (b, calls) = fake(1);
    let mut r = rig(b);
    let d = &mut r.dev;
    assert_eq!(d.rd(0x4000, 8), 0x1234_5678);
    assert_eq!(d.rd(0x4000, 4), 0x1234_5678);
    assert_eq!(d.rd(0x4002, 2), 0x1234);
    assert_eq!(d.rd(0x4000 + 58, 4), 0xffff, "bytes past the config read 0");
    let generation = d.rd(cc::CFGGEN, 1);
    d.wr(0x4000 + 32, 1, 1);
    assert_eq!(
        calls.lock().unwrap().last(),
        Some(&Call::WriteConfig(32, vec![1]))
    );
    assert_eq!(d.rd(0x4000 + 32, 1), 1);
    assert_eq!(
        d.rd(cc::CFGGEN, 1),
        generation + 1,
        "config changed: new generation"
    );
    // ISR: the config-change bit, cleared by reading.
    d.notify_config_changed();
    assert_eq!(d.rd(0x2000, 1), 2);
    assert_eq!(d.rd(0x2000, 1), 0);
}

#[test]
fn pci_cfg_window_reaches_bar0() {
    let (b, _) = fake(2);
    let mut r = rig(b);
    let (caps, _) = parse_caps(&mut r.dev);
    let w = caps.iter().find(|c| c.cfg_type == 5).unwrap().at;
    let d = &mut r.dev;
    // Read num_queues (2 bytes at 0x12).
    d.cfg_wr(w + 4, 1, 0);
    d.cfg_wr(w + 8, 4, 0x12);
    d.cfg_wr(w + 12, 4, 2);
    assert_eq!(d.cfg_rd(w + 16, 2), 2);
    // Write device_status through the window.
    d.cfg_wr(w + 8, 4, 0x14);
    d.cfg_wr(w + 12, 4, 1);
    d.cfg_wr(w + 16, 1, 1);
    assert_eq!(d.rd(cc::STATUS, 1), 1);
    // A notify through the window kicks the queue.
    d.cfg_wr(w + 8, 4, 0x6004);
    d.cfg_wr(w + 12, 4, 2);
    d.cfg_wr(w + 16, 2, 1);
    assert_eq!(d.kick_eventfd(1).unwrap().read().unwrap(), 1);
    // Misaligned or oversized windows do nothing.
    d.cfg_wr(w + 8, 4, 0x13);
    assert_eq!(d.cfg_rd(w + 16, 4), 0);
    d.cfg_wr(w + 8, 4, 0x14);
    d.cfg_wr(w + 12, 4, 8);
    assert_eq!(d.cfg_rd(w + 16, 4), 0);
    d.cfg_wr(w + 4, 1, 1);
    d.cfg_wr(w + 12, 4, 1);
    assert_eq!(d.cfg_rd(w + 16, 4), 0, "only BAR0 exists");
}
