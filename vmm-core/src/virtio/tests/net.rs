//! virtio-net through the transport: config space and control queue served by the core, data
//! queues started on a real (in-process) vhost-user backend.

use super::vhost_user::{all_protocol, guest_ram, start_backend_queues};
use super::*;
use crate::memory::GuestMemoryMmap;
use crate::virtio::net::{NetDevice, NoBackendConfig};
use crate::virtio::vhost_user::{VhostUserDevice, VhostUserParams};
use ipc::control::NetConfig;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const CTRL_RING: u64 = 0x40_0000;
const CTRL_DATA: u64 = 0x50_0000;
/// Linux sizes every queue, the control queue too, at the device's maximum.
const QSIZE: u16 = 256;
const DEVICE_CFG: u64 = 0x4000;
const NOTIFY: u64 = 0x6000;

fn net_rig(pairs: u16) -> (Rig<NetDevice>, GuestMemoryMmap) {
    let mem = guest_ram();
    let (backend, stream) = start_backend_queues(all_protocol(), usize::from(pairs) * 2);
    // The backend daemon lives as long as the test process; the rig keeps the connection.
    std::mem::forget(backend);
    let vu = VhostUserDevice::connect(
        stream,
        VhostUserParams {
            label: "net test".into(),
            queues: usize::from(pairs) * 2,
            max_queue_size: 256,
            config_len: 0,
            policy: Box::new(NoBackendConfig),
            timeout: Duration::from_secs(5),
        },
        mem.clone(),
    )
    .unwrap();
    let nic = NetConfig {
        id: "net0".into(),
        mac: MAC,
        queue_pairs: pairs,
        mtu: Some(1400),
    };
    (
        rig(NetDevice::new("net test".into(), vu, mem.clone(), &nic)),
        mem,
    )
}

/// The driver side of the control queue: posts one command (readable parts, then a 1-byte
/// status buffer unless `status` is false) and returns the status byte's address.
struct Ctrl {
    next: u16,
    desc: u16,
}

impl Ctrl {
    fn post(&mut self, mem: &GuestMemoryMmap, parts: &[&[u8]], status: bool) -> u64 {
        let mut addr = CTRL_DATA + 0x1000 * u64::from(self.next % QSIZE);
        let head = self.desc;
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        for p in parts {
            mem.write_slice(p, GuestAddress(addr)).unwrap();
            descs.push((addr, u32::try_from(p.len()).unwrap(), 0));
            addr += 0x100;
        }
        let status_at = addr;
        mem.write_obj(0xaau8, GuestAddress(status_at)).unwrap();
        if status {
            descs.push((status_at, 1, 2));
        }
        let n = descs.len();
        for (i, (a, len, flags)) in descs.into_iter().enumerate() {
            let idx = (self.desc + u16::try_from(i).unwrap()) % QSIZE;
            let next_idx = (idx + 1) % QSIZE;
            let flags = flags | if i + 1 < n { 1 } else { 0 };
            let d = CTRL_RING + 16 * u64::from(idx);
            mem.write_obj(a, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next_idx, GuestAddress(d + 14)).unwrap();
        }
        self.desc = (self.desc + u16::try_from(n).unwrap()) % QSIZE;
        let slot = CTRL_RING + 0x1000 + 4 + 2 * u64::from(self.next % QSIZE);
        mem.write_obj(head % QSIZE, GuestAddress(slot)).unwrap();
        self.next = self.next.wrapping_add(1);
        mem.write_obj(self.next, GuestAddress(CTRL_RING + 0x1000 + 2))
            .unwrap();
        status_at
    }

    fn used(&self, mem: &GuestMemoryMmap) -> (u16, u32) {
        let idx: u16 = mem.read_obj(GuestAddress(CTRL_RING + 0x2000 + 2)).unwrap();
        let slot = CTRL_RING + 0x2000 + 4 + 8 * u64::from(idx.wrapping_sub(1) % QSIZE);
        let len: u32 = mem.read_obj(GuestAddress(slot + 4)).unwrap();
        (idx, len)
    }
}

fn bring_up(rig: &mut Rig<NetDevice>, mem: &GuestMemoryMmap, pairs: u16) {
    mem.write_slice(&[0u8; 0x3000], GuestAddress(CTRL_RING))
        .unwrap();
    let d = &mut rig.dev;
    enable_msix(d, &[(0, 0xfee0_0000, 0x40), (1, 0xfee0_0000, 0x41)]);
    assert_eq!(negotiate(d, u64::MAX), 0xb);
    d.wr(cc::MSIX, 2, 0);
    for q in 0..pairs * 2 {
        setup_queue(d, q, QSIZE, 0x10_0000 + 0x1_0000 * u64::from(q), 1);
    }
    setup_queue(d, pairs * 2, QSIZE, CTRL_RING, 1);
    d.wr(cc::STATUS, 1, 0xf);
    assert_eq!(d.rd(cc::STATUS, 1), 0xf, "activation failed");
}

fn notify(rig: &mut Rig<NetDevice>, queue: u16) {
    rig.dev
        .wr(NOTIFY + 4 * u64::from(queue), 2, u64::from(queue));
}

#[test]
fn config_space_and_features_are_the_cores() {
    let (mut rig, _mem) = net_rig(2);
    let d = &mut rig.dev;
    assert_eq!(d.rd(cc::NUMQ, 2), 5, "2 pairs and the control queue");
    let mac: Vec<u8> = (0..6)
        .map(|i| u8::try_from(d.rd(DEVICE_CFG + i, 1)).unwrap())
        .collect();
    assert_eq!(mac, MAC);
    assert_eq!(d.rd(DEVICE_CFG + 6, 2), 1, "link up");
    assert_eq!(d.rd(DEVICE_CFG + 8, 2), 2, "max_virtqueue_pairs");
    assert_eq!(d.rd(DEVICE_CFG + 10, 2), 1400, "mtu");
    let offered = d.offered_features();
    for bit in [3, 5, 16, 17, 18, 22, 23, 32] {
        assert_ne!(offered & (1 << bit), 0, "feature bit {bit} offered");
    }
    // Offloads come from the backend only: the test backend's bits 11 and 12 (blk's MQ and
    // CONFIG_WCE) read as HOST_TSO4/6 here, and no other offload is offered.
    assert_eq!(offered & 0x7fc3, 0x1800, "{offered:#x}");
    // Data queues notify through ioeventfds, the control queue traps.
    let notify_addrs: Vec<u64> = rig
        .vm
        .ioevents
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(notify_addrs.len(), 4, "{notify_addrs:x?}");
    assert!(!notify_addrs.contains(&(BAR + NOTIFY + 16)));
}

#[test]
fn control_queue_sets_queue_pairs_rx_mode_and_mac() {
    let (mut rig, mem) = net_rig(2);
    bring_up(&mut rig, &mem, 2);
    let mut ctrl = Ctrl { next: 0, desc: 0 };
    assert_eq!(rig.dev.backend().active_pairs(), 1, "multiqueue starts off");

    let st = ctrl.post(&mem, &[&[4, 0], &2u16.to_le_bytes()], true);
    notify(&mut rig, 4);
    assert_eq!(ctrl.used(&mem), (1, 1));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
        0,
        "VIRTIO_NET_OK"
    );
    assert_eq!(rig.dev.backend().active_pairs(), 2);
    assert!(
        rig.vm.irqfds.lock().unwrap().len() >= 2,
        "vectors are irqfds"
    );

    // More pairs than the device has: VIRTIO_NET_ERR, nothing changes.
    let st = ctrl.post(&mem, &[&[4, 0], &3u16.to_le_bytes()], true);
    notify(&mut rig, 4);
    assert_eq!(ctrl.used(&mem), (2, 1));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), 1);
    assert_eq!(rig.dev.backend().active_pairs(), 2);

    // Promiscuous off, then a MAC filter table.
    let st = ctrl.post(&mem, &[&[0, 0], &[0]], true);
    let mut table = 1u32.to_le_bytes().to_vec();
    table.extend_from_slice(&[2, 0, 0, 0, 0, 9]);
    table.extend_from_slice(&0u32.to_le_bytes());
    let st2 = ctrl.post(&mem, &[&[1, 0], &table], true);
    notify(&mut rig, 4);
    assert_eq!(ctrl.used(&mem).0, 4, "both commands served by one notify");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st2)).unwrap(), 0);
    let f = rig.dev.backend().rx_filter();
    assert!(!f.promisc);
    assert_eq!(f.unicast, vec![[2, 0, 0, 0, 0, 9]]);
    assert!(f.multicast.is_empty());

    // A new MAC address shows in the config space under a new generation.
    let generation = rig.dev.rd(cc::CFGGEN, 1);
    let st = ctrl.post(&mem, &[&[1, 1], &[2, 1, 2, 3, 4, 5]], true);
    notify(&mut rig, 4);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), 0);
    assert_eq!(rig.dev.rd(DEVICE_CFG, 1), 2);
    assert_eq!(rig.dev.rd(DEVICE_CFG + 5, 1), 5);
    assert_ne!(rig.dev.rd(cc::CFGGEN, 1), generation);

    // A chain without a status buffer is completed with length 0 and the queue goes on.
    ctrl.post(&mem, &[&[0, 0], &[1]], false);
    notify(&mut rig, 4);
    assert_eq!(ctrl.used(&mem), (6, 0));
    let st = ctrl.post(&mem, &[&[0, 0], &[1]], true);
    notify(&mut rig, 4);
    assert_eq!(ctrl.used(&mem), (7, 1));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(st)).unwrap(), 0);
    assert!(rig.dev.backend().rx_filter().promisc);

    // Reset returns to one pair and the default filter.
    rig.dev.wr(cc::STATUS, 1, 0);
    assert_eq!(rig.dev.backend().active_pairs(), 1);
    assert!(rig.dev.backend().rx_filter().promisc);
}
