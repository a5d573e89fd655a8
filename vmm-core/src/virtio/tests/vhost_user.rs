//! Real vhost-user exchanges: the transport and [`VhostUserDevice`] against an in-process
//! `vhost-user-backend` daemon, with memfd guest RAM and split rings built by hand.
//!
//! No test can block forever on a socket: every frontend exchange runs under the device's
//! deadline (at most [`WAIT`] here), and as a backstop each test's sockets are shut down by a
//! [`HangGuard`] after [`TEST_LIMIT`], so a broken deadline fails the test instead of hanging
//! it. Everything else the tests wait for (used rings, interrupts) is polled with a deadline.

use super::*;
use crate::memory::{self, GuestMemoryMmap};
use crate::virtio::Restartable;
use crate::virtio::status;
use crate::virtio::vhost_user::{
    ConfigPolicy, VhostUserDevice, VhostUserError, VhostUserParams, with_deadline,
};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vhost::vhost_user::Listener;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

const MARKER: u32 = 0xc0de_0000;
const RING_SIZE: u16 = 8;
const RING_BASE: u64 = 0x10_0000;
const BUFFERS: u64 = 0x20_0000;
const WAIT: Duration = Duration::from_secs(5);
/// How long a test may keep a vhost-user socket before [`HangGuard`] shuts it down.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// Longest stall of a stuck backend (it normally ends when the test drops the [`Backend`]).
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// Shuts a socket down once [`TEST_LIMIT`] has passed, unless dropped first: any read still
/// blocked on it (in the frontend, or in the backend daemon on the other end) then fails, and
/// the test with it, loudly.
pub(super) struct HangGuard {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HangGuard {
    pub(super) fn new(sock: &UnixStream) -> Self {
        let sock = sock.try_clone().unwrap();
        let test = std::thread::current()
            .name()
            .unwrap_or("a vhost-user test")
            .to_owned();
        let (stop, wait) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("test-hang-guard".into())
            .spawn(move || {
                if wait.recv_timeout(TEST_LIMIT) == Err(mpsc::RecvTimeoutError::Timeout) {
                    eprintln!(
                        "{test}: still using its vhost-user socket after {TEST_LIMIT:?}; \
                         shutting it down so the blocked exchange fails"
                    );
                    let _ = sock.shutdown(Shutdown::Both);
                }
            })
            .unwrap();
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for HangGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Makes the backend's GET_VRING_BASE hang until released (or [`STALL_LIMIT`]).
#[derive(Default)]
struct Stall {
    released: Mutex<bool>,
    cond: Condvar,
}

impl Stall {
    fn wait(&self) {
        let released = self.released.lock().unwrap();
        let _ = self
            .cond
            .wait_timeout_while(released, STALL_LIMIT, |r| !*r)
            .unwrap();
    }

    fn release(&self) {
        *self.released.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

/// VERSION_1, MQ (12), CONFIG_WCE (11), PROTOCOL_FEATURES (30).
const FEATURES: u64 = (1 << 32) | (1 << 12) | (1 << 11) | (1 << 30);

/// A blk-shaped backend: completes each request by writing `MARKER | head` into its
/// write-only buffer.
struct TestBackend {
    mem: Mem,
    queues: usize,
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    log: Arc<Mutex<Vec<String>>>,
    /// GET_VRING_BASE hangs until this is released (a stuck backend).
    stall_stop: Option<Arc<Stall>>,
}

impl VhostUserBackendMut for TestBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        self.queues
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn acked_features(&mut self, features: u64) {
        self.log
            .lock()
            .unwrap()
            .push(format!("acked {features:#x}"));
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }
    fn reset_device(&mut self) {
        self.log.lock().unwrap().push("reset".into());
    }
    fn set_event_idx(&mut self, _enabled: bool) {}
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (o, s) = (offset as usize, size as usize);
        self.config
            .get(o..o + s)
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
    fn set_config(&mut self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("set_config {offset} {buf:?}"));
        let o = offset as usize;
        self.config[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn update_memory(&mut self, _mem: Mem) -> std::io::Result<()> {
        Ok(())
    }
    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some(new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap())
    }
    fn stop_vring(&mut self, queue: u32) -> std::io::Result<()> {
        self.log.lock().unwrap().push(format!("stop {queue}"));
        if let Some(stall) = &self.stall_stop {
            stall.wait();
        }
        Ok(())
    }
    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock<Mem>],
        _thread: usize,
    ) -> std::io::Result<()> {
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        let mem = self.mem.memory();
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            for desc in chain.clone() {
                if desc.is_write_only() {
                    mem.write_obj(MARKER | u32::from(head), desc.addr())
                        .map_err(std::io::Error::other)?;
                }
            }
            self.log.lock().unwrap().push(format!("done {head}"));
            vring
                .add_used(head, 4)
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        }
        vring.signal_used_queue()
    }
}

/// A running daemon with one accepted connection, and the frontend's end of it.
pub(super) struct Backend {
    daemon: VhostUserDaemon<Arc<RwLock<TestBackend>>>,
    pub log: Arc<Mutex<Vec<String>>>,
    path: PathBuf,
    stall: Option<Arc<Stall>>,
    _guard: HangGuard,
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stall) = &self.stall {
            stall.release();
        }
        self.daemon.request_shutdown();
        let _ = self.daemon.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(super) fn blk_config() -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&0x8000u64.to_le_bytes()); // capacity
    c[34..36].copy_from_slice(&2u16.to_le_bytes()); // num_queues
    c
}

pub(super) fn start_backend(protocol: VhostUserProtocolFeatures) -> (Backend, UnixStream) {
    start_backend_with(protocol, blk_config())
}

fn start_backend_with(
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
) -> (Backend, UnixStream) {
    start_backend_full(protocol, config, None, 2)
}

/// A backend running `queues` queues, with no config space of its own (a net backend).
pub(super) fn start_backend_queues(
    protocol: VhostUserProtocolFeatures,
    queues: usize,
) -> (Backend, UnixStream) {
    start_backend_full(protocol, Vec::new(), None, queues)
}

fn start_backend_full(
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    stall_stop: Option<Arc<Stall>>,
    queues: usize,
) -> (Backend, UnixStream) {
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "atoll-vmm-core-vu-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let mut listener = Listener::new(&path, true).unwrap();
    let stream = UnixStream::connect(&path).unwrap();
    let guard = HangGuard::new(&stream);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = Arc::new(RwLock::new(TestBackend {
        mem: mem.clone(),
        queues,
        protocol,
        config,
        log: log.clone(),
        stall_stop: stall_stop.clone(),
    }));
    let mut daemon = VhostUserDaemon::new("test-blk".into(), backend, mem).unwrap();
    daemon.start(&mut listener).unwrap();
    let backend = Backend {
        daemon,
        log,
        path,
        stall: stall_stop,
        _guard: guard,
    };
    (backend, stream)
}

struct WritebackOnly;

impl ConfigPolicy for WritebackOnly {
    fn fixup(&self, config: &mut [u8], num_queues: usize) {
        config[34..36].copy_from_slice(&u16::try_from(num_queues).unwrap().to_le_bytes());
    }
    fn writable(&self, offset: u32, len: usize, features: u64) -> bool {
        offset == 32 && len == 1 && features & (1 << 11) != 0
    }
}

fn params(queues: usize, timeout: Duration) -> VhostUserParams {
    VhostUserParams {
        label: "test".into(),
        queues,
        max_queue_size: 256,
        config_len: 60,
        policy: Box::new(WritebackOnly),
        timeout,
    }
}

pub(super) fn guest_ram() -> GuestMemoryMmap {
    let f = memfd::MemfdOptions::default()
        .create("test-guest-ram")
        .unwrap()
        .into_file();
    f.set_len(16 << 20).unwrap();
    memory::map_guest_ram(f, 16 << 20).unwrap()
}

pub(super) fn all_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// The driver side of one split ring at `RING_BASE` (the layout `setup_queue` programs).
struct Ring {
    next: u16,
}

impl Ring {
    fn desc(&self) -> u64 {
        RING_BASE
    }
    fn avail(&self) -> u64 {
        RING_BASE + 0x1000
    }
    fn used(&self) -> u64 {
        RING_BASE + 0x2000
    }
    fn buffer(i: u16) -> u64 {
        BUFFERS + 0x1000 * u64::from(i)
    }

    /// Zeroes the ring, as a driver allocating it does.
    fn clear(&mut self, mem: &GuestMemoryMmap) {
        mem.write_slice(&[0u8; 0x3000], GuestAddress(RING_BASE))
            .unwrap();
        self.next = 0;
    }

    /// Posts one 4-byte device-writable buffer; returns its head.
    fn post(&mut self, mem: &GuestMemoryMmap) -> u16 {
        let head = self.next % RING_SIZE;
        let d = self.desc() + 16 * u64::from(head);
        mem.write_obj(Self::buffer(self.next), GuestAddress(d))
            .unwrap();
        mem.write_obj(4u32, GuestAddress(d + 8)).unwrap();
        mem.write_obj(2u16, GuestAddress(d + 12)).unwrap(); // VIRTQ_DESC_F_WRITE
        mem.write_obj(0u16, GuestAddress(d + 14)).unwrap();
        mem.write_obj(0u32, GuestAddress(Self::buffer(self.next)))
            .unwrap();
        mem.write_obj(head, GuestAddress(self.avail() + 4 + 2 * u64::from(head)))
            .unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        self.next = self.next.wrapping_add(1);
        mem.write_obj(self.next, GuestAddress(self.avail() + 2))
            .unwrap();
        head
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used() + 2)).unwrap()
    }

    fn wait_used(&self, mem: &GuestMemoryMmap, idx: u16) -> bool {
        let start = Instant::now();
        while start.elapsed() < WAIT {
            if self.used_idx(mem) == idx {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

fn wait_readable(evt: &EventFd) -> Option<u64> {
    let start = Instant::now();
    while start.elapsed() < WAIT {
        if let Ok(n) = evt.read() {
            return Some(n);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Linux's bring-up of a 1-queue device: MSI-X (config vector 0, queue vector 1),
/// features, the ring, DRIVER_OK.
fn bring_up(rig: &mut Rig<VhostUserDevice>, mem: &GuestMemoryMmap, ring: &mut Ring) {
    ring.clear(mem);
    let d = &mut rig.dev;
    enable_msix(d, &[(0, 0xfee0_0000, 0x40), (1, 0xfee0_0000, 0x41)]);
    assert_eq!(negotiate(d, u64::MAX), 0xb);
    d.wr(cc::MSIX, 2, 0);
    assert_eq!(setup_queue(d, 0, RING_SIZE, RING_BASE, 1), 1);
    d.wr(cc::STATUS, 1, 0xf);
    assert_eq!(
        d.rd(cc::STATUS, 1),
        0xf,
        "activation failed: DEVICE_NEEDS_RESET"
    );
}

/// One request through the running device: post, kick (as KVM's ioeventfd would), wait for
/// the used ring and the MSI-X vector's eventfd.
fn request(rig: &Rig<VhostUserDevice>, mem: &GuestMemoryMmap, ring: &mut Ring) {
    let n = ring.next;
    let head = ring.post(mem);
    rig.dev.kick_eventfd(0).unwrap().write(1).unwrap();
    assert!(ring.wait_used(mem, n + 1), "request {n} not completed");
    let used_id: u32 = mem
        .read_obj(GuestAddress(ring.used() + 4 + 8 * u64::from(n % RING_SIZE)))
        .unwrap();
    assert_eq!(used_id, u32::from(head));
    let got: u32 = mem.read_obj(GuestAddress(Ring::buffer(n))).unwrap();
    assert_eq!(got, MARKER | u32::from(head));
    assert!(
        wait_readable(rig.dev.vector(1).unwrap().0).is_some(),
        "no interrupt on the queue's vector"
    );
}

#[test]
fn negotiation_caches_the_config_and_caps_the_queues() {
    let (backend, stream) = start_backend(all_protocol());
    let dev = VhostUserDevice::connect(stream, params(1, WAIT), guest_ram()).unwrap();
    assert!(dev.is_connected());
    assert_eq!(
        dev.num_queues(),
        1,
        "the device asked for 1 of the backend's 2"
    );
    assert_eq!(dev.protocol_features(), all_protocol());
    assert_eq!(dev.device_features(), FEATURES & !(1 << 30));
    let cfg = dev.config();
    assert_eq!(cfg.len(), 60);
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 0x8000);
    assert_eq!(
        u16::from_le_bytes([cfg[34], cfg[35]]),
        1,
        "num_queues fixed up"
    );
    drop(dev);
    drop(backend);

    // Without MQ the backend runs one queue whatever was asked.
    let (backend, stream) =
        start_backend(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK);
    let dev = VhostUserDevice::connect(stream, params(4, WAIT), guest_ram()).unwrap();
    assert_eq!(dev.num_queues(), 1);
    drop(dev);
    drop(backend);

    // A blk device needs CONFIG.
    let (backend, stream) = start_backend(VhostUserProtocolFeatures::MQ);
    let err = VhostUserDevice::connect(stream, params(1, WAIT), guest_ram())
        .err()
        .unwrap();
    assert!(
        matches!(err, VhostUserError::ProtocolFeatures { missing, .. } if missing == VhostUserProtocolFeatures::CONFIG),
        "{err:?}"
    );
    drop(backend);
}

#[test]
fn a_silent_backend_times_out_instead_of_hanging() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let _guard = HangGuard::new(&ours);
    let timeout = Duration::from_millis(100);
    let start = Instant::now();
    let err = VhostUserDevice::connect(ours, params(1, timeout), guest_ram())
        .err()
        .unwrap();
    let took = start.elapsed();
    assert!(took >= timeout, "failed before the deadline");
    assert!(
        took < TEST_LIMIT,
        "only the hang guard ended the wait: the deadline did not"
    );
    // Normally SET_OWNER and GET_FEATURES are sent and the wait for the features' reply is
    // cut; on a loaded machine the deadline may pass even before the first write.
    let VhostUserError::Timeout { source, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(
        matches!(
            source.as_deref(),
            Some(VhostUserError::Request {
                request: "SET_OWNER" | "GET_FEATURES",
                ..
            })
        ),
        "{err:?}"
    );
    // The frontend's end is shut down: the backend's end reads what was sent, then EOF.
    let mut sent = Vec::new();
    theirs
        .set_read_timeout(Some(WAIT))
        .expect("a read timeout on the backend's end");
    theirs.read_to_end(&mut sent).unwrap();
    assert!(sent.len() <= 2 * 12, "only header-only requests: {sent:?}");
}

#[test]
fn an_exchange_that_overruns_its_deadline_fails_even_if_it_finished() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let _guard = HangGuard::new(&ours);
    // The exchange waits for a reply that only the watchdog's shutdown ends, then "succeeds".
    let r = with_deadline(&ours, Duration::from_millis(50), || {
        let n = (&ours).read(&mut [0u8; 1]).unwrap();
        assert_eq!(n, 0, "nothing was sent; only the shutdown ends the read");
        Ok(())
    });
    assert!(
        matches!(r, Err(VhostUserError::Timeout { source: None, .. })),
        "{r:?}"
    );
    theirs.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(theirs.read(&mut [0u8; 1]).unwrap(), 0, "the peer sees EOF");

    // In time: the result passes through and the socket stays usable.
    let (mut ours, mut theirs) = UnixStream::pair().unwrap();
    let _guard = HangGuard::new(&ours);
    let r = with_deadline(&ours, WAIT, || Ok(7));
    assert!(matches!(r, Ok(7)), "{r:?}");
    let e = with_deadline(&ours, WAIT, || -> Result<(), _> {
        Err(VhostUserError::Disconnected)
    });
    assert!(matches!(e, Err(VhostUserError::Disconnected)), "{e:?}");
    ours.write_all(b"x").unwrap();
    theirs.set_read_timeout(Some(WAIT)).unwrap();
    let mut b = [0u8; 1];
    theirs.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
}

fn run_device_lifecycle(protocol: VhostUserProtocolFeatures) {
    let mem = guest_ram();
    let (backend, stream) = start_backend(protocol);
    let dev = VhostUserDevice::connect(stream, params(1, WAIT), mem.clone()).unwrap();
    let mut r = rig(dev);
    let mut ring = Ring { next: 0 };

    // Device config from the cache; the writable byte goes to the backend.
    assert_eq!(r.dev.rd(0x4000, 8), 0x8000);
    r.dev.wr(0x4000 + 32, 1, 1);
    assert_eq!(r.dev.rd(0x4000 + 32, 1), 1);
    r.dev.wr(0x4000, 8, 7);
    assert_eq!(r.dev.rd(0x4000, 8), 0x8000, "capacity is read-only");
    assert_eq!(
        backend
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("set_config"))
            .count(),
        1
    );

    bring_up(&mut r, &mem, &mut ring);
    assert!(
        backend
            .log
            .lock()
            .unwrap()
            .contains(&format!("acked {:#x}", FEATURES)),
        "SET_FEATURES carries the driver's features and bit 30"
    );
    request(&r, &mem, &mut ring);
    request(&r, &mem, &mut ring);

    // Reset: the ring stops (GET_VRING_BASE) and, if negotiated, the device resets.
    r.dev.wr(cc::STATUS, 1, 0);
    assert_eq!(r.dev.rd(cc::STATUS, 1), 0);
    {
        let log = backend.log.lock().unwrap();
        assert!(log.contains(&"stop 0".to_string()), "{log:?}");
        assert_eq!(
            log.contains(&"reset".to_string()),
            protocol.contains(VhostUserProtocolFeatures::RESET_DEVICE)
        );
        assert!(
            !log.contains(&"stop 1".to_string()),
            "queue 1 never started"
        );
    }
    // A stopped ring ignores new requests...
    let before = ring.used_idx(&mem);
    ring.post(&mem);
    r.dev.kick_eventfd(0).unwrap().write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ring.used_idx(&mem), before);
    // ...and a fresh bring-up on the same connection works again.
    bring_up(&mut r, &mem, &mut ring);
    request(&r, &mem, &mut ring);
    assert!(r.dev.backend().is_connected());
    drop(r);
    drop(backend);
}

#[test]
fn lifecycle_with_reset_device() {
    run_device_lifecycle(all_protocol());
}

#[test]
fn lifecycle_without_reset_device() {
    run_device_lifecycle(
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK,
    );
}

#[test]
fn rings_outside_guest_ram_are_refused_before_anything_is_sent() {
    let mem = guest_ram();
    let (backend, stream) = start_backend(all_protocol());
    let dev = VhostUserDevice::connect(stream, params(1, WAIT), mem.clone()).unwrap();
    let mut r = rig(dev);
    let d = &mut r.dev;
    negotiate(d, u64::MAX);
    // The used ring runs past the end of the 16 MiB of RAM.
    setup_queue(d, 0, RING_SIZE, (16 << 20) - 0x2000, NO_VECTOR_Q);
    d.wr(cc::STATUS, 1, 0xf);
    assert_ne!(
        d.rd(cc::STATUS, 1) & u64::from(status::DEVICE_NEEDS_RESET),
        0
    );
    assert!(
        d.backend().is_connected(),
        "the guest's mistake keeps the backend"
    );
    assert!(
        !backend
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("acked")),
        "no SET_FEATURES was sent"
    );
    // Reset has nothing to stop; a correct bring-up then works.
    d.wr(cc::STATUS, 1, 0);
    assert!(d.backend().is_connected());
    let mut ring = Ring { next: 0 };
    bring_up(&mut r, &mem, &mut ring);
    request(&r, &mem, &mut ring);
    drop(r);
    drop(backend);
}

const NO_VECTOR_Q: u16 = crate::virtio::pci::NO_VECTOR;

#[test]
fn a_dead_backend_at_driver_ok_means_needs_reset_not_a_hang() {
    let mem = guest_ram();
    let (backend, stream) = start_backend(all_protocol());
    let dev = VhostUserDevice::connect(stream, params(1, WAIT), mem.clone()).unwrap();
    let mut r = rig(dev);
    drop(backend);
    let mut ring = Ring { next: 0 };
    ring.clear(&mem);
    let d = &mut r.dev;
    negotiate(d, u64::MAX);
    setup_queue(d, 0, RING_SIZE, RING_BASE, NO_VECTOR_Q);
    d.wr(cc::STATUS, 1, 0xf);
    assert_ne!(
        d.rd(cc::STATUS, 1) & u64::from(status::DEVICE_NEEDS_RESET),
        0
    );
    assert!(!d.backend().is_connected());
    // Reset with no backend completes.
    d.wr(cc::STATUS, 1, 0);
    assert_eq!(d.rd(cc::STATUS, 1), 0);
}

#[test]
fn reconnect_replays_the_rings_from_used_idx() {
    let mem = guest_ram();
    let (backend, stream) = start_backend(all_protocol());
    let dev = VhostUserDevice::connect(stream, params(1, WAIT), mem.clone()).unwrap();
    let mut r = rig(dev);
    let mut ring = Ring { next: 0 };
    bring_up(&mut r, &mem, &mut ring);
    request(&r, &mem, &mut ring);
    request(&r, &mem, &mut ring);

    // The backend dies. The guest submits while no backend exists: its notify lands in the
    // kick eventfd (which stays registered with KVM).
    drop(backend);
    let lost = ring.next;
    ring.post(&mem);
    r.dev.kick_eventfd(0).unwrap().write(1).unwrap();
    mem.write_obj(0u32, GuestAddress(Ring::buffer(0))).unwrap();
    while r.dev.vector(1).unwrap().0.read().is_ok() {}

    // A new incarnation: the setup is replayed and the ring resumes at used.idx (2), so
    // the request posted in between completes and the finished ones are not redone.
    let (backend2, stream2) = start_backend(all_protocol());
    let changed = r.dev.backend_mut().reconnect(stream2).unwrap();
    assert!(!changed, "same config");
    assert!(ring.wait_used(&mem, lost + 1), "request posted while down");
    let got: u32 = mem.read_obj(GuestAddress(Ring::buffer(lost))).unwrap();
    assert_eq!(got, MARKER | u32::from(lost % RING_SIZE));
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(Ring::buffer(0))).unwrap(),
        0,
        "request 0 not executed again"
    );
    assert!(wait_readable(r.dev.vector(1).unwrap().0).is_some());
    {
        let log = backend2.log.lock().unwrap();
        assert_eq!(
            log.iter().filter(|l| l.starts_with("done")).count(),
            1,
            "{log:?}"
        );
        assert!(log.contains(&format!("acked {:#x}", FEATURES)));
    }
    // The new backend serves further requests and stops on reset.
    request(&r, &mem, &mut ring);
    r.dev.wr(cc::STATUS, 1, 0);
    assert!(backend2.log.lock().unwrap().contains(&"stop 0".to_string()));
    drop(r);
    drop(backend2);
}

#[test]
fn reconnect_with_another_config_raises_a_config_change() {
    let mem = guest_ram();
    let (backend, stream) = start_backend(all_protocol());
    let dev = VhostUserDevice::connect(stream, params(1, WAIT), mem.clone()).unwrap();
    let mut r = rig(dev);
    enable_msix(&mut r.dev, &[(0, 0xfee0_0000, 0x40)]);
    r.dev.wr(cc::MSIX, 2, 0);
    drop(backend);

    // The same backend again: nothing changes for the driver.
    let (backend2, stream2) = start_backend(all_protocol());
    let generation = r.dev.rd(cc::CFGGEN, 1);
    r.dev.reconnect_backend(stream2).unwrap();
    assert_eq!(r.dev.rd(cc::CFGGEN, 1), generation);
    assert!(
        r.dev.vector(0).unwrap().0.read().is_err(),
        "no config interrupt"
    );
    drop(backend2);

    // The next incarnation reports a bigger disk: new generation, config interrupt, new
    // capacity.
    let mut bigger = blk_config();
    bigger[0..8].copy_from_slice(&0x9000u64.to_le_bytes());
    let (backend3, stream3) = start_backend_with(all_protocol(), bigger);
    r.dev.reconnect_backend(stream3).unwrap();
    assert_ne!(r.dev.rd(cc::CFGGEN, 1), generation);
    assert_eq!(r.dev.vector(0).unwrap().0.read().unwrap(), 1);
    assert_eq!(r.dev.rd(0x4000, 8), 0x9000);
    assert_eq!(r.dev.rd(0x2000, 1), 2, "ISR config bit");
    drop(r);
    drop(backend3);
}

#[test]
fn a_stuck_backend_cannot_hold_a_vcpu_past_the_deadline() {
    let mem = guest_ram();
    let stall = Some(Arc::new(Stall::default()));
    let (backend, stream) = start_backend_full(all_protocol(), blk_config(), stall, 2);
    // Setup runs with the usual deadline (a short one would fail it on a loaded machine).
    let dev = VhostUserDevice::connect(stream, params(1, WAIT), mem.clone()).unwrap();
    let mut r = rig(dev);
    let mut ring = Ring { next: 0 };
    bring_up(&mut r, &mem, &mut ring);
    request(&r, &mem, &mut ring);
    // GET_VRING_BASE hangs in the backend until the backend is dropped: the reset still
    // completes, after the deadline, and the connection goes.
    let timeout = Duration::from_secs(1);
    r.dev.backend_mut().set_timeout(timeout);
    let start = Instant::now();
    r.dev.wr(cc::STATUS, 1, 0);
    let took = start.elapsed();
    assert!(took >= timeout, "the reset ended before the deadline");
    assert!(
        took < STALL_LIMIT,
        "the vCPU waited for the backend to get unstuck"
    );
    assert_eq!(r.dev.rd(cc::STATUS, 1), 0);
    assert!(!r.dev.backend().is_connected());
    // The backend did get the stop (it reads what was sent before the shutdown).
    let got_stop = || backend.log.lock().unwrap().contains(&"stop 0".to_string());
    let start = Instant::now();
    while !got_stop() && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(got_stop(), "{:?}", backend.log.lock().unwrap());
    drop(r);
    drop(backend);
}
