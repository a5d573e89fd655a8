//! Builds the VM from the launcher's `Start` message and runs it until it ends.

use crate::bus::Bus;
use crate::exit::ExitSignal;
use crate::memory::{self, GuestMemoryMmap};
use crate::vcpu::{self, VcpuContext};
use crate::virtio::DeviceRequest;
use crate::{acpi, boot, cpu, platform};
use ipc::control::{CoreChannel, CoreToLauncher, ExitReason, LauncherToCore, VmConfig};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Cap, Kvm, VmFd};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// Where KVM puts the TSS and identity-map pages it needs: in the 32-bit hole, above the PCI
/// window and the IOAPIC/LAPIC pages (the conventional addresses).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// The KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

/// Errors of building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("the Start message carries {got} descriptors; the configuration needs {want}")]
    FdCount { got: usize, want: usize },
    #[error("/dev/kvm speaks API version {0}, not {KVM_API_VERSION}")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(Cap),
    #[error("{step} failed")]
    Kvm {
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error(transparent)]
    Platform(#[from] platform::PlatformError),
    #[error(transparent)]
    Disk(#[from] crate::virtio::blk::BlkError),
    #[error(transparent)]
    Net(#[from] crate::virtio::net::NetError),
    #[error("cannot set up the VM's exit signal or threads")]
    Os(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// The descriptors of a `Start` message, in the order `LauncherToCore::Start` documents.
pub struct StartFds {
    pub kvm: OwnedFd,
    pub memfd: File,
    pub kernel: File,
    pub initramfs: Option<File>,
    pub console: UnixStream,
    pub disks: Vec<UnixStream>,
    pub nets: Vec<UnixStream>,
}

impl StartFds {
    /// Splits the attached descriptors according to `cfg`.
    pub fn parse(cfg: &VmConfig, fds: Vec<OwnedFd>) -> Result<Self, VmError> {
        let want = 4 + usize::from(cfg.has_initramfs) + cfg.disks.len() + cfg.nets.len();
        if fds.len() != want {
            return Err(VmError::FdCount {
                got: fds.len(),
                want,
            });
        }
        let mut it = fds.into_iter();
        let mut next = || it.next().expect("count checked above");
        let kvm = next();
        let memfd = File::from(next());
        let kernel = File::from(next());
        let initramfs = cfg.has_initramfs.then(|| File::from(next()));
        let console = UnixStream::from(next());
        let disks = cfg.disks.iter().map(|_| UnixStream::from(next())).collect();
        let nets = cfg.nets.iter().map(|_| UnixStream::from(next())).collect();
        Ok(Self {
            kvm,
            memfd,
            kernel,
            initramfs,
            console,
            disks,
            nets,
        })
    }
}

fn kvm_err(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { step, source }
}

fn open_kvm(fd: OwnedFd) -> Result<Kvm, VmError> {
    // SAFETY: `fd` is the /dev/kvm descriptor the launcher opened and passed to us; we own it
    // and hand its ownership to `Kvm`.
    let kvm = unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) };
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(VmError::ApiVersion(version));
    }
    for cap in [
        Cap::Irqchip,
        Cap::UserMemory,
        Cap::Ioeventfd,
        Cap::Irqfd,
        Cap::Pit2,
        Cap::IrqRouting,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    Ok(kvm)
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Builds the VM, runs it, and returns why it ended.
pub fn run(cfg: &VmConfig, mut fds: StartFds, chan: &CoreChannel) -> Result<ExitReason, VmError> {
    let kvm = open_kvm(fds.kvm)?;
    let vm = Arc::new(create_vm(&kvm)?);
    let mem: GuestMemoryMmap = memory::map_guest_ram(fds.memfd, cfg.memory_bytes)?;
    memory::register_with_kvm(&vm, &mem)?;

    let rsdp = acpi::create_acpi_tables(&mem, cfg.cpus)?;
    let entry = boot::load(
        &mem,
        boot::BootPayload {
            kernel: &mut fds.kernel,
            initramfs: fds.initramfs.as_mut(),
            cmdline: &cfg.cmdline,
            rsdp,
        },
    )?;
    drop(fds.kernel);
    drop(fds.initramfs);

    let exit = Arc::new(ExitSignal::new().map_err(VmError::Os)?);
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let platform = platform::Platform::attach(&vm, &pio, &mmio, &exit, fds.console)?;
    // One GSI router owns KVM's routing table; one virtio-blk PCI device per disk socket, then
    // one virtio-net PCI device per NIC socket.
    let gsi_router = Arc::new(crate::irq_routing::GsiRouter::new(vm.clone()));
    let disks = crate::virtio::blk::attach_disks(
        vm.clone(),
        &gsi_router,
        &mem,
        &platform.pci,
        &cfg.disks,
        fds.disks,
    )?;
    let nics = crate::virtio::net::attach_nics(
        vm.clone(),
        &gsi_router,
        &mem,
        &platform.pci,
        &cfg.nets,
        fds.nets,
    )?;

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::new();
    for id in 0..cfg.cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut this_cpuid = cpuid.clone();
        cpu::patch_cpuid(&mut this_cpuid, id, cfg.cpus, tsc_deadline);
        cpu::configure(&vcpu, id, &this_cpuid, (id == 0).then_some(entry))?;
        vcpus.push(vcpu);
    }

    vcpu::install_kick_signal().map_err(VmError::Signal)?;
    let ctx = Arc::new(VcpuContext {
        pio,
        mmio,
        exit: Arc::clone(&exit),
        unhandled: Default::default(),
    });
    let mut handles = Vec::new();
    for (id, vcpu) in (0u32..).zip(vcpus) {
        match vcpu::spawn(id, vcpu, Arc::clone(&ctx)) {
            Ok(h) => handles.push(h),
            Err(e) => {
                exit.request(ExitReason::Internal(format!("cannot start vCPU {id}: {e}")));
                break;
            }
        }
    }
    if let Err(e) = chan.send(&CoreToLauncher::Running, &[]) {
        exit.request(ExitReason::Internal(format!(
            "cannot report to the launcher: {e}"
        )));
    }
    let devices = crate::virtio::Devices::new(
        cfg.disks.iter().map(|d| d.id.clone()).zip(disks),
        cfg.nets.iter().map(|n| n.id.clone()).zip(nics),
    );
    wait_for_exit(&exit, chan, &devices);
    vcpu::stop_all(handles);
    Ok(exit.reason().unwrap_or(ExitReason::Stopped))
}

/// Blocks until a device or vCPU requests the exit, or the launcher asks for a stop (or goes
/// away).
fn wait_for_exit(exit: &ExitSignal, chan: &CoreChannel, devices: &crate::virtio::Devices) {
    let mut chan_open = true;
    while !exit.is_set() {
        let mut fds = vec![PollFd::new(exit.as_fd(), PollFlags::POLLIN)];
        if chan_open {
            fds.push(PollFd::new(chan.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => {
                exit.request(ExitReason::Internal(format!("poll failed: {e}")));
                break;
            }
        }
        let chan_ready = chan_open
            && fds
                .get(1)
                .and_then(PollFd::revents)
                .is_some_and(|r| !r.is_empty());
        if chan_ready {
            match chan.recv() {
                Ok((LauncherToCore::Shutdown, _)) => exit.request(ExitReason::Stopped),
                Ok((LauncherToCore::DeviceDown { device }, _)) => {
                    if let Err(e) = devices.handle(&device, DeviceRequest::Down) {
                        tracing::warn!("DeviceDown: {e}");
                    }
                }
                Ok((LauncherToCore::DeviceFailed { device }, _)) => {
                    if let Err(e) = devices.handle(&device, DeviceRequest::Fail) {
                        tracing::warn!("DeviceFailed: {e}");
                    }
                }
                Ok((LauncherToCore::Reconnect { device }, fds)) => {
                    let error = match <[OwnedFd; 1]>::try_from(fds) {
                        Ok([fd]) => devices
                            .handle(&device, DeviceRequest::Reconnect(UnixStream::from(fd)))
                            .err(),
                        Err(fds) => Some(format!(
                            "Reconnect carries {} descriptors, expected 1",
                            fds.len()
                        )),
                    };
                    match &error {
                        None => tracing::info!(%device, "backend reconnected"),
                        Some(e) => tracing::error!(%device, "cannot reconnect the backend: {e}"),
                    }
                    let reply = CoreToLauncher::Reconnected { device, error };
                    if let Err(e) = chan.send(&reply, &[]) {
                        tracing::warn!("cannot answer the launcher: {e}");
                    }
                }
                Ok((other, _)) => tracing::warn!("ignoring unexpected control message {other:?}"),
                Err(e) => {
                    tracing::warn!("control channel failed ({e}); stopping the VM");
                    chan_open = false;
                    exit.request(ExitReason::Stopped);
                }
            }
        }
    }
}
