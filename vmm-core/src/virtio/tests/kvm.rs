//! The transport on a real KVM VM: routing tables, irqfds and ioeventfds are accepted by the
//! kernel, and `attach_disks` plugs real devices into a PCI root.

use super::vhost_user::{all_protocol, blk_config, guest_ram, start_backend};
use super::*;
use crate::bus::Bus;
use crate::devices::PciRoot;
use crate::irq_routing::{MsiMessage, Route};
use crate::virtio::blk;
use ipc::control::DiskConfig;
use kvm_ioctls::{Kvm, VmFd};

fn kvm_vm() -> Arc<VmFd> {
    let kvm = Kvm::new().expect("/dev/kvm is required for this test");
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    Arc::new(vm)
}

#[test]
fn msix_routes_irqfds_and_notifies_on_kvm() {
    let vm = kvm_vm();
    let router = Arc::new(GsiRouter::new(vm.clone()));
    let (b, calls) = fake(2);
    let mut dev = VirtioPciDevice::new(
        &DeviceInfo {
            label: "kvm test".into(),
            device_type: 2,
            class: 1,
            subclass: 0,
        },
        b,
        vm.clone(),
        router.clone(),
    )
    .unwrap();
    dev.config_mut().set_bar_addr(0, BAR).unwrap();
    dev.register_notifiers().unwrap();

    // KVM accepts the whole table (default routes + MSI) and the irqfds on it.
    enable_msix(
        &mut dev,
        &[
            (0, 0xfee0_0000, 0x40),
            (1, 0xfee0_0000, 0x41),
            (2, 0xfee0_0000, 0x42),
        ],
    );
    let routes = router.routes();
    for v in 0..3u32 {
        let gsi = dev.vector(usize::try_from(v).unwrap()).unwrap().1;
        assert!(routes.contains(&Route::Msi {
            gsi,
            msg: MsiMessage {
                address: 0xfee0_0000,
                data: 0x40 + v
            }
        }));
        // The irqfd is registered: registering it again is refused by KVM.
        let (evt, _) = dev.vector(usize::try_from(v).unwrap()).unwrap();
        assert!(vm.register_irqfd(evt, gsi).is_err());
    }
    // Legacy irqfds still find their irqchip routes.
    let serial = EventFd::new(0).unwrap();
    vm.register_irqfd(&serial, 4).unwrap();

    // Masking a vector unregisters its irqfd (so it can be registered again by hand).
    dev.wr(0x8000 + 16 + 12, 4, 1);
    let (evt, gsi) = dev.vector(1).unwrap();
    vm.register_irqfd(evt, gsi).unwrap();
    vm.unregister_irqfd(evt, gsi).unwrap();
    dev.wr(0x8000 + 16 + 12, 4, 0);

    // Notify ioeventfds are live at BAR0 + 0x6000 + 4q (KVM refuses a second wildcard
    // ioeventfd on a taken address), and move with the BAR.
    let probe = EventFd::new(0).unwrap();
    for q in [0, 4] {
        assert!(
            crate::virtio::VmEventFds::register_ioevent(vm.as_ref(), &probe, BAR + 0x6000 + q)
                .is_err()
        );
    }
    dev.config_mut().set_bar_addr(0, 0xd000_0000).unwrap();
    dev.bar_moved(0, BAR, 0xd000_0000);
    for q in [0, 4] {
        crate::virtio::VmEventFds::register_ioevent(vm.as_ref(), &probe, BAR + 0x6000 + q)
            .expect("the old registration is gone");
        crate::virtio::VmEventFds::unregister_ioevent(vm.as_ref(), &probe, BAR + 0x6000 + q)
            .unwrap();
        assert!(
            crate::virtio::VmEventFds::register_ioevent(vm.as_ref(), &probe, 0xd000_6000 + q)
                .is_err()
        );
    }
    assert!(calls.lock().unwrap().is_empty());
}

#[test]
fn attach_disks_plugs_one_device_per_socket() {
    let vm = kvm_vm();
    let router = Arc::new(GsiRouter::new(vm.clone()));
    let mem = guest_ram();
    let mmio = Arc::new(Bus::new());
    let pio = Arc::new(Bus::new());
    let pci = Mutex::new(PciRoot::new(mmio.clone(), pio));
    let (b0, s0) = start_backend(all_protocol());
    let (b1, s1) = start_backend(all_protocol());
    let disks = [
        DiskConfig {
            id: "disk0".into(),
            queues: 1,
        },
        DiskConfig {
            id: "disk1".into(),
            queues: 2,
        },
    ];
    assert!(matches!(
        blk::attach_disks(vm.clone(), &router, &mem, &pci, &disks, vec![]),
        Err(blk::BlkError::Count {
            disks: 2,
            sockets: 0
        })
    ));
    let devs = blk::attach_disks(vm.clone(), &router, &mem, &pci, &disks, vec![s0, s1]).unwrap();
    assert_eq!(devs.len(), 2);

    let mut bars = Vec::new();
    for (slot, (dev, queues)) in devs.iter().zip([1u16, 2]).enumerate() {
        let slot = u8::try_from(slot + 1).unwrap();
        let root = pci.lock().unwrap();
        assert_eq!(root.config_read(0, slot, 0, 0), 0x1042_1af4);
        drop(root);
        let d = dev.lock().unwrap();
        let bar = d.config().bar_addr(0);
        assert!((crate::layout::PCI_MMIO32_START..crate::layout::PCI_MMIO32_END).contains(&bar));
        assert_ne!(d.config().command() & 0x2, 0, "memory decoding on");
        bars.push(bar);
        drop(d);
        // Guest accesses through the MMIO bus reach the device: num_queues and capacity.
        let mut b = [0u8; 2];
        assert!(mmio.read(bar + 0x12, &mut b));
        assert_eq!(u16::from_le_bytes(b), queues);
        let mut c = [0u8; 8];
        assert!(mmio.read(bar + 0x4000, &mut c));
        assert_eq!(c, blk_config()[0..8]);
        let mut n = [0u8; 2];
        assert!(mmio.read(bar + 0x4000 + 34, &mut n));
        assert_eq!(u16::from_le_bytes(n), queues, "config num_queues matches");
    }
    assert_ne!(bars[0], bars[1]);
    drop(devs);
    drop(b0);
    drop(b1);
}
