//! The VM's GSI routing table: the one owner of `KVM_SET_GSI_ROUTING`.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so every route the VM needs lives here:
//! the default irqchip routes KVM installs at `KVM_CREATE_IRQCHIP` (GSI 0..=15 to the IOAPIC pin
//! and the PIC, GSI 16..=23 to the IOAPIC only; the serial port's and the RTC's irqfds rely on
//! them) plus one MSI route per allocated GSI from [`layout::irq::MSI_GSI_START`] up. Every
//! change re-sends the whole table.
//!
//! A device allocates a GSI per MSI/MSI-X vector once ([`GsiRouter::allocate_msi`]), registers
//! its irqfd on it, and points the route at whatever message the guest programmed
//! ([`GsiRouter::set_msi_route`]).

use crate::layout;
use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
    kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip, kvm_irq_routing_msi,
};
use kvm_ioctls::VmFd;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// GSIs KVM accepts on x86 (`KVM_MAX_IRQ_ROUTES`): routes use GSIs below this.
pub const MAX_GSI: u32 = 4096;
/// GSIs KVM routes to the PIC as well as the IOAPIC by default.
const PIC_GSIS: u32 = 16;

/// An MSI message: what a device writes (`data`) and where (`address`) to raise an interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// An interrupt controller input, as KVM names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqChip {
    PicMaster,
    PicSlave,
    Ioapic,
}

/// One entry of the routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// GSI `gsi` asserts `pin` of `chip`.
    Irqchip { gsi: u32, chip: IrqChip, pin: u32 },
    /// GSI `gsi` delivers the MSI message `msg`.
    Msi { gsi: u32, msg: MsiMessage },
}

impl Route {
    /// The KVM form of the route.
    pub fn to_kvm(self) -> kvm_irq_routing_entry {
        match self {
            Route::Irqchip { gsi, chip, pin } => kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    irqchip: kvm_irq_routing_irqchip {
                        irqchip: match chip {
                            IrqChip::PicMaster => KVM_IRQCHIP_PIC_MASTER,
                            IrqChip::PicSlave => KVM_IRQCHIP_PIC_SLAVE,
                            IrqChip::Ioapic => KVM_IRQCHIP_IOAPIC,
                        },
                        pin,
                    },
                },
                ..Default::default()
            },
            Route::Msi { gsi, msg } => kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_irq_routing_msi {
                        address_lo: low32(msg.address),
                        address_hi: high32(msg.address),
                        data: msg.data,
                        ..Default::default()
                    },
                },
                ..Default::default()
            },
        }
    }
}

fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked to 32 bits")
}

fn high32(v: u64) -> u32 {
    u32::try_from(v >> 32).expect("shifted to 32 bits")
}

/// Errors of GSI routing.
#[derive(Debug, thiserror::Error)]
pub enum IrqRoutingError {
    #[error("no free GSI for an MSI route: all of {start}..{MAX_GSI} are in use", start = layout::irq::MSI_GSI_START)]
    Exhausted,
    #[error("GSI {0} is not an allocated MSI route")]
    NotAllocated(u32),
    #[error("cannot build a routing table of {0} entries")]
    Table(usize),
    #[error("KVM refused a routing table of {entries} entries")]
    Kvm {
        entries: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Where the table goes: KVM (`VmFd`), or a recorder in tests.
pub trait RoutingTable: Send + Sync {
    /// Replaces the whole routing table with `routes`.
    fn set_gsi_routing(&self, routes: &[Route]) -> Result<(), IrqRoutingError>;
}

impl RoutingTable for VmFd {
    fn set_gsi_routing(&self, routes: &[Route]) -> Result<(), IrqRoutingError> {
        let entries: Vec<_> = routes.iter().copied().map(Route::to_kvm).collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| IrqRoutingError::Table(entries.len()))?;
        VmFd::set_gsi_routing(self, &table).map_err(|source| IrqRoutingError::Kvm {
            entries: entries.len(),
            source,
        })
    }
}

/// The routes KVM's in-kernel irqchip starts with (`default_routing` in KVM's x86
/// `irq_comm.c`): GSI n to IOAPIC pin n for n < 24, and GSI n < 16 also to PIC pin n % 8 of the
/// master (n < 8) or slave PIC.
pub fn default_routes() -> Vec<Route> {
    let mut routes = Vec::new();
    for gsi in 0..layout::irq::IOAPIC_PINS {
        routes.push(Route::Irqchip {
            gsi,
            chip: IrqChip::Ioapic,
            pin: gsi,
        });
        if gsi < PIC_GSIS {
            routes.push(Route::Irqchip {
                gsi,
                chip: if gsi < 8 {
                    IrqChip::PicMaster
                } else {
                    IrqChip::PicSlave
                },
                pin: gsi % 8,
            });
        }
    }
    routes
}

/// The VM-wide GSI router (share it as `Arc<GsiRouter>`).
pub struct GsiRouter {
    table: Arc<dyn RoutingTable>,
    /// Allocated MSI GSIs and their message (`None` until the first `set_msi_route`).
    msi: Mutex<BTreeMap<u32, Option<MsiMessage>>>,
}

impl GsiRouter {
    /// A router that sends its tables to `table`. Nothing is sent until a route changes, so
    /// KVM keeps its default table until the first MSI route.
    pub fn new(table: Arc<dyn RoutingTable>) -> Self {
        Self {
            table,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Option<MsiMessage>>> {
        self.msi.lock().expect("GSI router lock poisoned")
    }

    /// Reserves the lowest free GSI at or above `MSI_GSI_START` for an MSI route. It has no
    /// route (and costs no ioctl) until [`set_msi_route`](Self::set_msi_route).
    pub fn allocate_msi(&self) -> Result<u32, IrqRoutingError> {
        let mut msi = self.lock();
        let gsi = (layout::irq::MSI_GSI_START..MAX_GSI)
            .find(|g| !msi.contains_key(g))
            .ok_or(IrqRoutingError::Exhausted)?;
        msi.insert(gsi, None);
        Ok(gsi)
    }

    /// Points `gsi` (from [`allocate_msi`](Self::allocate_msi)) at `msg` and re-sends the
    /// table; nothing is sent if the route already holds `msg`. If KVM refuses the table, the
    /// previous route stays.
    pub fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqRoutingError> {
        let mut msi = self.lock();
        let slot = msi
            .get_mut(&gsi)
            .ok_or(IrqRoutingError::NotAllocated(gsi))?;
        if *slot == Some(msg) {
            return Ok(());
        }
        let old = slot.replace(msg);
        let result = self.table.set_gsi_routing(&Self::build(&msi));
        if result.is_err() {
            msi.insert(gsi, old);
        }
        result
    }

    /// The table as it was last sent (or would be sent now).
    #[cfg(test)]
    pub fn routes(&self) -> Vec<Route> {
        Self::build(&self.lock())
    }

    fn build(msi: &BTreeMap<u32, Option<MsiMessage>>) -> Vec<Route> {
        let mut routes = default_routes();
        routes.extend(
            msi.iter()
                .filter_map(|(&gsi, msg)| msg.map(|msg| Route::Msi { gsi, msg })),
        );
        routes
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records every table sent; refuses tables while `fail` is set.
    #[derive(Default)]
    pub(crate) struct RecordingTable {
        pub sent: Mutex<Vec<Vec<Route>>>,
        pub fail: std::sync::atomic::AtomicBool,
    }

    impl RoutingTable for RecordingTable {
        fn set_gsi_routing(&self, routes: &[Route]) -> Result<(), IrqRoutingError> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(IrqRoutingError::Kvm {
                    entries: routes.len(),
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
            self.sent.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
    }

    fn msg(data: u32) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000,
            data,
        }
    }

    #[test]
    fn default_table_matches_kvm() {
        let routes = default_routes();
        // 24 IOAPIC pins plus 16 PIC inputs.
        assert_eq!(routes.len(), 40);
        assert!(routes.contains(&Route::Irqchip {
            gsi: 4,
            chip: IrqChip::Ioapic,
            pin: 4
        }));
        assert!(routes.contains(&Route::Irqchip {
            gsi: 4,
            chip: IrqChip::PicMaster,
            pin: 4
        }));
        assert!(routes.contains(&Route::Irqchip {
            gsi: 8,
            chip: IrqChip::PicSlave,
            pin: 0
        }));
        assert!(routes.contains(&Route::Irqchip {
            gsi: 23,
            chip: IrqChip::Ioapic,
            pin: 23
        }));
        assert!(!routes.iter().any(|r| matches!(
            r,
            Route::Irqchip {
                gsi: 16..,
                chip: IrqChip::PicMaster | IrqChip::PicSlave,
                ..
            }
        )));
    }

    #[test]
    fn msi_routes_resend_the_whole_table() {
        let rec = Arc::new(RecordingTable::default());
        let router = GsiRouter::new(rec.clone());
        let a = router.allocate_msi().unwrap();
        let b = router.allocate_msi().unwrap();
        assert_eq!((a, b), (24, 25));
        assert!(
            rec.sent.lock().unwrap().is_empty(),
            "allocation sends nothing"
        );

        router.set_msi_route(b, msg(0x41)).unwrap();
        router.set_msi_route(b, msg(0x41)).unwrap(); // unchanged: no ioctl
        router.set_msi_route(a, msg(0x42)).unwrap();
        let sent = rec.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].len(), 41);
        assert_eq!(sent[1].len(), 42);
        assert_eq!(&sent[1][..40], &default_routes()[..]);
        assert_eq!(
            sent[1][40..],
            [
                Route::Msi {
                    gsi: 24,
                    msg: msg(0x42)
                },
                Route::Msi {
                    gsi: 25,
                    msg: msg(0x41)
                }
            ]
        );

        assert_eq!(router.allocate_msi().unwrap(), 26);
        assert!(matches!(
            router.set_msi_route(99, msg(1)),
            Err(IrqRoutingError::NotAllocated(99))
        ));
    }

    #[test]
    fn refused_table_keeps_the_old_route() {
        let rec = Arc::new(RecordingTable::default());
        let router = GsiRouter::new(rec.clone());
        let g = router.allocate_msi().unwrap();
        router.set_msi_route(g, msg(1)).unwrap();
        rec.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(router.set_msi_route(g, msg(2)).is_err());
        assert!(router.routes().contains(&Route::Msi {
            gsi: g,
            msg: msg(1)
        }));
    }

    #[test]
    fn kvm_form_of_routes() {
        let e = Route::Msi {
            gsi: 30,
            msg: MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4031,
            },
        }
        .to_kvm();
        assert_eq!((e.gsi, e.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was built with its `msi` member, the one read here.
        let m = unsafe { e.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4031)
        );
        let e = Route::Irqchip {
            gsi: 9,
            chip: IrqChip::PicSlave,
            pin: 1,
        }
        .to_kvm();
        assert_eq!(e.type_, KVM_IRQ_ROUTING_IRQCHIP);
        // SAFETY: the entry was built with its `irqchip` member, the one read here.
        let c = unsafe { e.u.irqchip };
        assert_eq!((c.irqchip, c.pin), (KVM_IRQCHIP_PIC_SLAVE, 1));
    }
}
