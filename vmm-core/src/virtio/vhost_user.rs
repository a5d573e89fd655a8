//! A vhost-user frontend (the `vhost` crate's [`Frontend`]) as a [`VirtioBackend`].
//!
//! Sequence (`reference/protocols-crates.md` §1.3):
//! - at creation ([`VhostUserDevice::connect`]): SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_
//!   FEATURES, GET_QUEUE_NUM, GET_CONFIG; the config space is cached and served from here;
//! - at DRIVER_OK ([`VirtioBackend::activate`]): SET_FEATURES (driver features | bit 30),
//!   SET_MEM_TABLE, then per enabled queue SET_VRING_NUM/ADDR (core virtual addresses)/BASE/
//!   CALL/KICK/ENABLE;
//! - at device reset: SET_VRING_ENABLE 0 and GET_VRING_BASE per started queue, then
//!   RESET_DEVICE if negotiated.
//!
//! What a restarted backend needs is kept here (DESIGN.md §4): the guest RAM mapping, the
//! driver's features, each started ring's addresses and duplicates of its kick and call
//! eventfds (the originals stay registered with KVM, so notifies and interrupts are not lost
//! while no backend exists), and the config space. [`VhostUserDevice::reconnect`] replays
//! the whole setup on a new connection and resumes each ring at the guest's `used.idx`, which
//! is exact for backends that complete each queue in order (ours do).
//!
//! Why `used.idx` and not `INFLIGHT_SHMFD`: the in-flight region only helps backends that
//! complete out of order, and `vhost-user-backend` 0.24 (which dev-blk and dev-net build on)
//! does not implement it, nor does qemu-storage-daemon need it for in-order export queues.
//! Replaying from `used.idx` re-executes what the dead backend had taken but not completed:
//! idempotent for block reads, writes and flushes; a network frame may be sent twice, which
//! the protocols above Ethernet tolerate. Nothing the guest submitted is lost or failed.
//!
//! Every exchange (the handshake, an activation, a reset, a config write) must finish within
//! [`SOCKET_TIMEOUT`], so a stuck backend costs a vCPU at most that long: a watchdog shuts the
//! socket down when the deadline passes, and an exchange that overran it fails even if its
//! last reply arrived just in time (the socket is shut down by then). (Socket timeouts cannot
//! do it: the `vhost` crate retries reads that fail with `EAGAIN`.) An exchange whose watchdog
//! cannot be started is not attempted. After any failed exchange the connection is dropped
//! (the stream may be out of step); the device then waits for
//! [`reconnect`](VhostUserDevice::reconnect).

#![forbid(unsafe_code)]

use super::failed::{DrainedQueue, Drainer, FailPolicy};
use super::pci::VirtioPciDevice;
use super::{ActiveQueue, QueueConfig, VIRTIO_F_VERSION_1, VirtioBackend};
use crate::memory::GuestMemoryMmap;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, Le16};
use vmm_sys_util::eventfd::EventFd;

/// Longest time one exchange with the backend may take. Generous on purpose: a live backend on
/// an overloaded host (or in a nested testbed) can take seconds to answer, and cutting it off
/// fails the device for the guest, while a truly stuck backend leaves the guest's disk stuck
/// either way; the deadline only bounds how long it can hold a vCPU.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// The protocol features the frontend uses when the backend offers them.
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
}

const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// `VIRTIO_RING_F_EVENT_IDX`.
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Errors of the vhost-user frontend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("cannot duplicate the vhost-user socket for its watchdog")]
    Socket(#[source] std::io::Error),
    #[error("cannot start the watchdog thread of a vhost-user exchange")]
    Watchdog(#[source] std::io::Error),
    #[error(
        "the backend did not finish the exchange within {timeout:?}; the connection was shut down"
    )]
    Timeout {
        timeout: Duration,
        /// How the exchange failed once the socket was shut down (`None`: it had finished).
        #[source]
        source: Option<Box<VhostUserError>>,
    },
    #[error("vhost-user {request} failed")]
    Request {
        request: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error(
        "the backend's features {0:#x} lack VHOST_USER_F_PROTOCOL_FEATURES (bit 30) or VIRTIO_F_VERSION_1 (bit 32)"
    )]
    Features(u64),
    #[error("the backend's protocol features {have:?} lack {missing:?}")]
    ProtocolFeatures {
        have: VhostUserProtocolFeatures,
        missing: VhostUserProtocolFeatures,
    },
    #[error("the backend offers no queues")]
    NoQueues,
    #[error("queue {queue}'s {ring} ({len} bytes at {gpa:#x}) is not inside guest RAM")]
    RingOutsideRam {
        queue: u16,
        ring: &'static str,
        gpa: u64,
        len: u64,
    },
    #[error("guest RAM at {gpa:#x} cannot be shared (no backing file)")]
    MemoryRegion {
        gpa: u64,
        #[source]
        source: vhost::Error,
    },
    #[error("cannot read used.idx of queue {queue} at {gpa:#x}")]
    UsedIdx {
        queue: u16,
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot duplicate an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("the new backend lacks features {missing:#x} the driver is using")]
    FeaturesLost { missing: u64 },
    #[error("the new backend has {got} queues; the device has {want}")]
    QueuesLost { got: usize, want: usize },
    #[error("the backend is not connected")]
    Disconnected,
}

fn req(request: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Request { request, source }
}

/// Device-type knowledge the generic frontend needs about the config space.
pub trait ConfigPolicy: Send {
    /// Adjusts the backend's config space to what the transport offers (virtio-blk's
    /// `num_queues` when fewer queues are used than the backend has).
    fn fixup(&self, config: &mut [u8], num_queues: usize);
    /// Whether the driver may write `len` bytes at `offset` with `features` negotiated.
    /// Anything else is dropped here: some backends end the connection on a refused write.
    fn writable(&self, offset: u32, len: usize, features: u64) -> bool;
}

/// What to ask of the backend.
pub struct VhostUserParams {
    /// Name in logs.
    pub label: String,
    /// Most queues to use (the backend may have fewer).
    pub queues: usize,
    /// Queue size limit offered to the driver (vhost-user has no message for it).
    pub max_queue_size: u16,
    /// Bytes of config space to fetch with GET_CONFIG (0: the device has none).
    pub config_len: u32,
    pub policy: Box<dyn ConfigPolicy>,
    /// Deadline of each exchange ([`SOCKET_TIMEOUT`] in production).
    pub timeout: Duration,
}

/// A started ring, kept for replay.
struct RunningQueue {
    config: QueueConfig,
    kick: EventFd,
    call: EventFd,
    /// Whether the ring is enabled (SET_VRING_ENABLE 1). virtio-net starts with only its first
    /// queue pair enabled and the driver enables the others through its control queue.
    enabled: bool,
}

/// What DRIVER_OK started: replayed on reconnect.
struct Running {
    features: u64,
    queues: Vec<RunningQueue>,
}

/// A live connection: the frontend and a duplicate of its socket for the watchdog.
struct Conn {
    fe: Frontend,
    sock: UnixStream,
}

/// Runs `f`, shutting `sock` down if `f` takes longer than `timeout`: blocked reads and writes
/// then fail and `f` returns with an error. Once the watchdog has shut the socket down, the
/// exchange fails with [`VhostUserError::Timeout`] whatever `f` returned: an `Ok` from a reply
/// that raced the deadline would leave the device believing in a connection the backend has
/// lost. If no watchdog can be started, `f` is not run at all (it could block forever).
pub(super) fn with_deadline<T>(
    sock: &UnixStream,
    timeout: Duration,
    f: impl FnOnce() -> Result<T, VhostUserError>,
) -> Result<T, VhostUserError> {
    let deadline = Instant::now() + timeout;
    std::thread::scope(|scope| {
        let (done, wait) = mpsc::channel::<()>();
        let watchdog = std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn_scoped(scope, move || {
                let left = deadline.saturating_duration_since(Instant::now());
                let expired = wait.recv_timeout(left) == Err(mpsc::RecvTimeoutError::Timeout);
                if expired {
                    tracing::warn!(
                        ?timeout,
                        "vhost-user backend did not answer in time; closing the connection"
                    );
                    let _ = sock.shutdown(Shutdown::Both);
                }
                expired
            })
            .map_err(VhostUserError::Watchdog)?;
        let result = f();
        drop(done);
        // A watchdog that panicked leaves the socket's state unknown: fail the exchange.
        let expired = watchdog.join().unwrap_or(true);
        match result {
            Err(e) if expired => Err(VhostUserError::Timeout {
                timeout,
                source: Some(Box::new(e)),
            }),
            Ok(_) if expired => Err(VhostUserError::Timeout {
                timeout,
                source: None,
            }),
            result => result,
        }
    })
}

/// The outcome of one handshake.
struct Negotiated {
    conn: Conn,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    num_queues: usize,
    config: Vec<u8>,
}

/// A virtio device whose queues run in a vhost-user backend.
pub struct VhostUserDevice {
    label: String,
    conn: Option<Conn>,
    mem: GuestMemoryMmap,
    wanted_queues: usize,
    max_queue_size: u16,
    config_len: u32,
    policy: Box<dyn ConfigPolicy>,
    timeout: Duration,
    /// The backend's GET_FEATURES answer.
    features: u64,
    protocol: VhostUserProtocolFeatures,
    num_queues: usize,
    config: Vec<u8>,
    running: Option<Running>,
    /// Set when the backend will not come back: requests are failed by [`Drainer`].
    failed: Option<Arc<dyn FailPolicy>>,
    drainer: Option<Drainer>,
}

impl VhostUserDevice {
    /// Negotiates with the backend on `stream` (§1.3 steps 1–5) and caches its config space.
    pub fn connect(
        stream: UnixStream,
        params: VhostUserParams,
        mem: GuestMemoryMmap,
    ) -> Result<Self, VhostUserError> {
        let mut dev = Self {
            label: params.label,
            conn: None,
            mem,
            wanted_queues: params.queues.max(1),
            max_queue_size: params.max_queue_size,
            config_len: params.config_len,
            policy: params.policy,
            timeout: params.timeout,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            num_queues: 0,
            config: Vec::new(),
            running: None,
            failed: None,
            drainer: None,
        };
        let n = dev.handshake(stream)?;
        dev.features = n.features;
        dev.protocol = n.protocol;
        dev.num_queues = n.num_queues;
        dev.config = n.config;
        dev.conn = Some(n.conn);
        tracing::info!(device = %dev.label,
            features = format_args!("{:#x}", dev.features),
            protocol = ?dev.protocol, queues = dev.num_queues, "vhost-user backend negotiated");
        Ok(dev)
    }

    fn handshake(&self, stream: UnixStream) -> Result<Negotiated, VhostUserError> {
        let sock = stream.try_clone().map_err(VhostUserError::Socket)?;
        let wanted = u64::try_from(self.wanted_queues).expect("queue count fits 64 bits");
        let mut fe = Frontend::from_stream(stream, wanted);
        let (features, protocol, num_queues, config) =
            with_deadline(&sock, self.timeout, || self.negotiate(&mut fe))?;
        Ok(Negotiated {
            conn: Conn { fe, sock },
            features,
            protocol,
            num_queues,
            config,
        })
    }

    /// §1.3 steps 1–5: features, protocol features, queue count, config space.
    fn negotiate(
        &self,
        fe: &mut Frontend,
    ) -> Result<(u64, VhostUserProtocolFeatures, usize, Vec<u8>), VhostUserError> {
        fe.set_owner().map_err(req("SET_OWNER"))?;
        let features = fe.get_features().map_err(req("GET_FEATURES"))?;
        if features & PROTOCOL_FEATURES_BIT == 0 || features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserError::Features(features));
        }
        let have = fe
            .get_protocol_features()
            .map_err(req("GET_PROTOCOL_FEATURES"))?;
        let protocol = have & wanted_protocol_features();
        if self.config_len > 0 && !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::ProtocolFeatures {
                have,
                missing: VhostUserProtocolFeatures::CONFIG,
            });
        }
        fe.set_protocol_features(protocol)
            .map_err(req("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let num_queues = if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let n = fe.get_queue_num().map_err(req("GET_QUEUE_NUM"))?;
            usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(self.wanted_queues)
        } else {
            1
        };
        if num_queues == 0 {
            return Err(VhostUserError::NoQueues);
        }
        let mut config = if self.config_len > 0 {
            let len = usize::try_from(self.config_len).expect("config length fits usize");
            let (_, payload) = fe
                .get_config(
                    0,
                    self.config_len,
                    VhostUserConfigFlags::empty(),
                    &vec![0; len],
                )
                .map_err(req("GET_CONFIG"))?;
            payload
        } else {
            Vec::new()
        };
        self.policy.fixup(&mut config, num_queues);
        Ok((features, protocol, num_queues, config))
    }

    /// Whether a backend is connected.
    #[cfg(test)]
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Changes the deadline of later exchanges.
    #[cfg(test)]
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The protocol features in use.
    #[cfg(test)]
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Drops the connection after a failed exchange; the ring state stays for a reconnect.
    fn disconnect(&mut self, why: &VhostUserError) {
        if self.conn.take().is_some() {
            tracing::error!(device = %self.label,
                "vhost-user backend connection dropped: {}", crate::error_chain(why));
        }
    }

    /// The core virtual address of `len` bytes of guest RAM at `gpa`, which must lie inside
    /// one region (what the backend can translate through the mem table).
    fn host_address(
        &self,
        queue: u16,
        ring: &'static str,
        gpa: u64,
        len: u64,
    ) -> Result<u64, VhostUserError> {
        let err = || VhostUserError::RingOutsideRam {
            queue,
            ring,
            gpa,
            len,
        };
        let region = self.mem.find_region(GuestAddress(gpa)).ok_or_else(err)?;
        let start = region.start_addr().0;
        let offset = gpa - start;
        if offset.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(err());
        }
        Ok(region.as_ptr() as u64 + offset)
    }

    fn vring_config(&self, q: &QueueConfig) -> Result<VringConfigData, VhostUserError> {
        let n = u64::from(q.size);
        Ok(VringConfigData {
            queue_max_size: self.max_queue_size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: self.host_address(q.index, "descriptor table", q.desc, 16 * n)?,
            // flags, idx, ring[n], used_event / avail_event.
            avail_ring_addr: self.host_address(q.index, "available ring", q.avail, 6 + 2 * n)?,
            used_ring_addr: self.host_address(q.index, "used ring", q.used, 6 + 8 * n)?,
            log_addr: None,
        })
    }

    /// §1.3 steps 6–9 for `running`, each ring resuming at `bases[i]`. Nothing is sent if a
    /// ring lies outside guest RAM.
    fn start(&mut self, running: &Running, bases: &[u16]) -> Result<(), VhostUserError> {
        let vrings = running
            .queues
            .iter()
            .map(|q| self.vring_config(&q.config))
            .collect::<Result<Vec<_>, _>>()?;
        let regions = self
            .mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|source| {
                    VhostUserError::MemoryRegion {
                        gpa: r.start_addr().0,
                        source,
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let timeout = self.timeout;
        let Conn { fe, sock } = self.conn.as_mut().ok_or(VhostUserError::Disconnected)?;
        let result = with_deadline(sock, timeout, || {
            fe.set_features(running.features | PROTOCOL_FEATURES_BIT)
                .map_err(req("SET_FEATURES"))?;
            fe.set_mem_table(&regions).map_err(req("SET_MEM_TABLE"))?;
            for ((q, vring), &base) in running.queues.iter().zip(&vrings).zip(bases) {
                let i = usize::from(q.config.index);
                fe.set_vring_num(i, q.config.size)
                    .map_err(req("SET_VRING_NUM"))?;
                fe.set_vring_addr(i, vring).map_err(req("SET_VRING_ADDR"))?;
                fe.set_vring_base(i, base).map_err(req("SET_VRING_BASE"))?;
                fe.set_vring_call(i, &q.call)
                    .map_err(req("SET_VRING_CALL"))?;
                fe.set_vring_kick(i, &q.kick)
                    .map_err(req("SET_VRING_KICK"))?;
                fe.set_vring_enable(i, q.enabled)
                    .map_err(req("SET_VRING_ENABLE"))?;
            }
            Ok(())
        });
        if let Err(e) = &result {
            self.disconnect(e);
        }
        result
    }

    /// Connects a new incarnation of the backend on `stream` and replays the setup: the
    /// handshake, and if the device runs, its rings resuming at the guest's `used.idx`,
    /// followed by one kick and one call per ring (covering notifies and completions that
    /// happened while no backend existed). Returns whether the config space changed (the
    /// transport then raises a config interrupt:
    /// [`VirtioPciDevice::notify_config_changed`](super::pci::VirtioPciDevice::notify_config_changed)).
    pub fn reconnect(&mut self, stream: UnixStream) -> Result<bool, VhostUserError> {
        self.conn = None;
        let n = self.handshake(stream)?;
        if let Some(r) = &self.running {
            let missing = r.features & !n.features;
            if missing != 0 {
                return Err(VhostUserError::FeaturesLost { missing });
            }
        }
        if n.num_queues < self.num_queues {
            return Err(VhostUserError::QueuesLost {
                got: n.num_queues,
                want: self.num_queues,
            });
        }
        let changed = n.config != self.config;
        self.drainer = None;
        self.failed = None;
        self.features = n.features;
        self.protocol = n.protocol;
        self.config = n.config;
        self.conn = Some(n.conn);
        if let Some(running) = self.running.take() {
            let result = self.resume(&running);
            self.running = Some(running);
            result?;
        }
        tracing::info!(device = %self.label, config_changed = changed, "vhost-user backend reconnected");
        Ok(changed)
    }

    fn resume(&mut self, running: &Running) -> Result<(), VhostUserError> {
        let bases = running
            .queues
            .iter()
            .map(|q| {
                let gpa = q.config.used + 2;
                self.mem
                    .read_obj::<Le16>(GuestAddress(gpa))
                    .map(u16::from)
                    .map_err(|source| VhostUserError::UsedIdx {
                        queue: q.config.index,
                        gpa,
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.start(running, &bases)?;
        for q in &running.queues {
            // A full counter still leaves the eventfd readable, so errors can be ignored.
            let _ = q.kick.write(1);
            let _ = q.call.write(1);
        }
        tracing::debug!(device = %self.label, ?bases, "rings resumed at used.idx");
        Ok(())
    }

    /// DRIVER_OK with only the queues for which `enabled(index)` holds enabled; the others are
    /// set up but stay disabled until [`set_queue_enabled`](Self::set_queue_enabled).
    pub fn activate_with(
        &mut self,
        features: u64,
        queues: &[ActiveQueue<'_>],
        enabled: impl Fn(u16) -> bool,
    ) -> Result<(), VhostUserError> {
        let dup = |e: &EventFd| e.try_clone().map_err(VhostUserError::EventFd);
        let running = Running {
            features,
            queues: queues
                .iter()
                .map(|q| {
                    Ok(RunningQueue {
                        config: q.config,
                        kick: dup(q.kick)?,
                        call: dup(q.call)?,
                        enabled: enabled(q.config.index),
                    })
                })
                .collect::<Result<_, VhostUserError>>()?,
        };
        if self.failed.is_some() {
            self.running = Some(running);
            self.start_drainer();
            return Ok(());
        }
        if self.conn.is_none() {
            tracing::warn!(device = %self.label, "backend not connected; the rings start when it reconnects");
            self.running = Some(running);
            return Ok(());
        }
        let zeros = vec![0u16; running.queues.len()];
        let result = self.start(&running, &zeros);
        // Kept for a reconnect unless the rings were refused before anything was sent (the
        // backend then has nothing to stop).
        if result.is_ok() || self.conn.is_none() {
            self.running = Some(running);
        }
        result
    }

    /// The launcher reports the backend process dead: drop the connection (the ring state
    /// stays for [`reconnect`](Self::reconnect)).
    pub fn disconnect_quietly(&mut self) {
        if self.conn.take().is_some() {
            tracing::warn!(device = %self.label, "backend process died; waiting for its restart");
        }
    }

    /// The backend will not come back: from now on the core completes the guest's requests
    /// as `policy` says (the outstanding ones too), until a device reset and beyond.
    pub fn fail(&mut self, policy: Arc<dyn FailPolicy>) {
        self.conn = None;
        self.failed = Some(policy);
        self.start_drainer();
    }

    fn start_drainer(&mut self) {
        self.drainer = None;
        let (Some(policy), Some(running)) = (self.failed.clone(), self.running.as_ref()) else {
            return;
        };
        let queues = running
            .queues
            .iter()
            .filter_map(|q| {
                Some(DrainedQueue {
                    config: q.config,
                    kick: q.kick.try_clone().ok()?,
                    call: q.call.try_clone().ok()?,
                })
            })
            .collect();
        let event_idx = running.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        match Drainer::start(&self.label, self.mem.clone(), queues, event_idx, policy) {
            Ok(d) => {
                tracing::error!(device = %self.label, "backend gone for good: the device fails every request");
                self.drainer = Some(d);
            }
            Err(e) => {
                tracing::error!(device = %self.label, "cannot start failing the requests of the lost backend; they hang: {e}");
            }
        }
    }

    /// Enables or disables started ring `index` (SET_VRING_ENABLE); remembered for a
    /// reconnect. A ring that was not started is ignored.
    pub fn set_queue_enabled(&mut self, index: u16, enabled: bool) -> Result<(), VhostUserError> {
        let Some(q) = self
            .running
            .as_mut()
            .and_then(|r| r.queues.iter_mut().find(|q| q.config.index == index))
        else {
            return Ok(());
        };
        if q.enabled == enabled {
            return Ok(());
        }
        q.enabled = enabled;
        let timeout = self.timeout;
        let Some(Conn { fe, sock }) = self.conn.as_mut() else {
            // Replayed by the reconnect.
            return Ok(());
        };
        let result = with_deadline(sock, timeout, || {
            fe.set_vring_enable(usize::from(index), enabled)
                .map_err(req("SET_VRING_ENABLE"))
        });
        if let Err(e) = &result {
            self.disconnect(e);
        }
        result
    }

    /// Stops the started rings and resets the backend (§1.3 "stop or guest reset").
    fn stop(&mut self, running: &Running) -> Result<(), VhostUserError> {
        let reset_device = self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE);
        let timeout = self.timeout;
        let Some(Conn { fe, sock }) = self.conn.as_mut() else {
            return Ok(());
        };
        let result = with_deadline(sock, timeout, || {
            for q in &running.queues {
                let i = usize::from(q.config.index);
                fe.set_vring_enable(i, false)
                    .map_err(req("SET_VRING_ENABLE"))?;
                let base = fe.get_vring_base(i).map_err(req("GET_VRING_BASE"))?;
                tracing::debug!(queue = i, base, "ring stopped");
            }
            if reset_device {
                fe.reset_device().map_err(req("RESET_DEVICE"))?;
            }
            Ok(())
        });
        if let Err(e) = &result {
            self.disconnect(e);
        }
        result
    }
}

impl VirtioBackend for VhostUserDevice {
    type Error = VhostUserError;

    fn device_features(&self) -> u64 {
        self.features & !PROTOCOL_FEATURES_BIT
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<bool, VhostUserError> {
        let features = self.running.as_ref().map_or(self.features, |r| r.features);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let fits = start
            .checked_add(data.len())
            .is_some_and(|end| end <= self.config.len());
        if !fits || !self.policy.writable(offset, data.len(), features) {
            tracing::debug!(device = %self.label, offset, len = data.len(), "read-only config write dropped");
            return Ok(false);
        }
        let timeout = self.timeout;
        let Conn { fe, sock } = self.conn.as_mut().ok_or(VhostUserError::Disconnected)?;
        let sent = with_deadline(sock, timeout, || {
            fe.set_config(offset, VhostUserConfigFlags::empty(), data)
                .map_err(req("SET_CONFIG"))
        });
        if let Err(e) = sent {
            self.disconnect(&e);
            return Err(e);
        }
        let changed = self.config[start..start + data.len()] != *data;
        self.config[start..start + data.len()].copy_from_slice(data);
        Ok(changed)
    }

    fn activate(
        &mut self,
        features: u64,
        queues: &[ActiveQueue<'_>],
    ) -> Result<(), VhostUserError> {
        self.activate_with(features, queues, |_| true)
    }

    fn reset(&mut self) -> Result<(), VhostUserError> {
        self.drainer = None;
        match self.running.take() {
            Some(running) => self.stop(&running),
            None => Ok(()),
        }
    }
}

impl super::Restartable for VirtioPciDevice<VhostUserDevice> {
    /// See [`VhostUserDevice::disconnect_quietly`].
    fn backend_down(&mut self) {
        self.backend_mut().disconnect_quietly();
    }

    /// The backend will not come back: requests fail with `VIRTIO_BLK_S_IOERR`.
    fn fail_backend(&mut self) {
        self.backend_mut().fail(Arc::new(super::failed::BlkIoError));
    }

    /// Reconnects the backend ([`VhostUserDevice::reconnect`]) and tells the driver if the
    /// config space changed.
    fn reconnect_backend(&mut self, stream: UnixStream) -> Result<(), VhostUserError> {
        if self.backend_mut().reconnect(stream)? {
            self.notify_config_changed();
        }
        Ok(())
    }
}
