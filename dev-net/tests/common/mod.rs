//! A test virtio-net driver for the process tests: memfd "guest RAM", split virtqueues laid out
//! in it, a vhost-user frontend (`vhost::vhost_user::Frontend`) talking to a real dev-net, and
//! the host side: a tap in a network namespace of the test's own, with an IPv4 address, so
//! frames the guest transmits arrive on ordinary UDP sockets and datagrams sent to the
//! guest's address come out of the tap.

#![allow(dead_code, reason = "each test uses a different subset")]
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::memfd::{MFdFlags, memfd_create};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

pub type GuestRam = GuestMemoryMmap<()>;

pub const BIN: &str = env!("CARGO_BIN_EXE_dev-net");

// virtio feature bits (local, so the driver does not lean on the device's crate).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_MQ: u64 = 1 << 22;
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// The guest's and the host's side of the link.
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const GUEST_MAC_STR: &str = "52:54:00:12:34:56";
pub const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const GUEST_IP: [u8; 4] = [10, 99, 0, 2];
pub const HOST_IP: [u8; 4] = [10, 99, 0, 1];

/// Rings live below this address; buffers above it.
const BUFFER_BASE: u64 = 1 << 20;
/// Guest RAM per queue for its rings (256 entries at most).
const RING_AREA: u64 = 0x4000;

// ---------------------------------------------------------------------------------------------
// Network namespace and tap

/// Moves the calling test thread into a new network namespace (processes it starts inherit
/// it); the namespace and its interfaces go away with the thread and those processes. IPv6 is
/// off there, so the kernel sends nothing on its own (router and neighbour solicitations).
/// Panics, failing the test, when the namespace cannot be made.
pub fn enter_netns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect(
        "unshare(CLONE_NEWNET) failed: the dev-net process tests need root (CAP_SYS_ADMIN) \
         to create a network namespace",
    );
    sh("echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6");
    ip(&["link", "set", "lo", "up"]);
}

fn sh(script: &str) {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip args...` in the test's namespace; panics if it fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Gives tap `name` (existing) the host's MAC and address, a permanent neighbour entry for
/// the guest, and sets it up.
pub fn configure_tap(name: &str, mtu: u32) {
    ip(&["link", "set", name, "address", "02:00:00:00:00:01"]);
    ip(&["link", "set", name, "mtu", &mtu.to_string()]);
    ip(&["addr", "add", "10.99.0.1/24", "dev", name]);
    ip(&["link", "set", name, "up"]);
    ip(&[
        "neigh",
        "add",
        "10.99.0.2",
        "lladdr",
        GUEST_MAC_STR,
        "dev",
        name,
        "nud",
        "permanent",
    ]);
}

/// Creates tap `name` (multi-queue or not) and configures it.
pub fn make_tap(name: &str, multi_queue: bool, mtu: u32) {
    let mut args = vec!["tuntap", "add", name, "mode", "tap"];
    if multi_queue {
        args.push("multi_queue");
    }
    ip(&args);
    configure_tap(name, mtu);
}

/// Waits until tap `name` is operationally up. A tap gets its carrier when a queue is
/// attached, but the kernel starts transmitting on it only after its link-watch work ran
/// (which needs the RTNL lock, contended when other tests create and destroy namespaces);
/// frames sent before are dropped by the still inactive qdisc.
pub fn wait_link_up(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ip(&["-o", "link", "show", name]).contains("state UP") {
        assert!(Instant::now() < deadline, "{name} did not come up");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A UDP socket of the host, bound to `10.99.0.1:port`.
pub fn host_socket(port: u16) -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind(("10.99.0.1", port)).expect("bind host socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Sends `payload` from the host's `sport` to the guest's `dport`.
pub fn send_to_guest(sport: u16, dport: u16, payload: &[u8]) {
    let s = std::net::UdpSocket::bind(("10.99.0.1", sport)).expect("bind sender");
    s.send_to(payload, ("10.99.0.2", dport))
        .expect("send to the guest");
}

// ---------------------------------------------------------------------------------------------
// Frames

/// The Internet checksum of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

/// An Ethernet/IPv4/UDP frame from the guest (GUEST_MAC, GUEST_IP:sport) to the host
/// (HOST_MAC, HOST_IP:dport), with UDP checksum `udp_csum` (0: none).
pub fn guest_udp_frame(sport: u16, dport: u16, payload: &[u8], udp_csum: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(42 + payload.len());
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(28 + payload.len()).expect("fits one datagram");
    let mut iph = [0u8; 20];
    iph[0] = 0x45;
    iph[2..4].copy_from_slice(&total.to_be_bytes());
    iph[6] = 0x40; // don't fragment
    iph[8] = 64;
    iph[9] = 17;
    iph[12..16].copy_from_slice(&GUEST_IP);
    iph[16..20].copy_from_slice(&HOST_IP);
    let c = inet_checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&iph);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    f.extend_from_slice(&udp_csum.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A received IPv4/UDP frame: `(src port, dst port, payload, UDP checksum field)`, or `None`
/// for anything else.
pub fn parse_udp(frame: &[u8]) -> Option<(u16, u16, Vec<u8>, u16)> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0xf) * 4;
    let udp = &frame[14 + ihl..];
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let csum = u16::from_be_bytes([udp[6], udp[7]]);
    Some((sport, dport, udp.get(8..len)?.to_vec(), csum))
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 249).unwrap().wrapping_mul(7) ^ seed)
        .collect()
}

/// A virtio-net header: `flags`, `gso_type`, `hdr_len`, `gso_size`, `csum_start`,
/// `csum_offset`, `num_buffers`.
pub fn net_header(flags: u8, csum_start: u16, csum_offset: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = flags;
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

// ---------------------------------------------------------------------------------------------
// Guest RAM and rings

/// Guest RAM backed by a memfd, shareable through `SET_MEM_TABLE`.
pub fn memfd_ram(size: usize) -> anyhow::Result<GuestRam> {
    let fd = memfd_create("guest-ram", MFdFlags::MFD_CLOEXEC).context("memfd_create")?;
    let file = File::from(fd);
    file.set_len(u64::try_from(size)?)?;
    GuestRam::from_ranges_with_files([(GuestAddress(0), size, Some(FileOffset::new(file, 0)))])
        .context("mapping guest RAM")
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A split virtqueue as the driver sees it.
pub struct Ring {
    pub index: usize,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub kick: EventFd,
    pub call: EventFd,
    call_watch: Epoll,
    pub event_idx: bool,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    free: VecDeque<u16>,
    /// Descriptors and buffers of each posted chain, by head.
    chains: Vec<(Vec<u16>, Vec<Buf>)>,
}

impl Ring {
    fn new(index: usize, size: u16, event_idx: bool) -> anyhow::Result<Self> {
        let base = GuestAddress(RING_AREA * u64::try_from(index)?);
        let call = EventFd::new(EFD_NONBLOCK)?;
        let call_watch = Epoll::new()?;
        call_watch.ctl(
            ControlOperation::Add,
            call.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        Ok(Self {
            index,
            size,
            desc: base,
            avail: base.unchecked_add(16 * u64::from(size)),
            used: base.unchecked_add(RING_AREA / 2),
            kick: EventFd::new(EFD_NONBLOCK)?,
            call,
            call_watch,
            event_idx,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            free: (0..size).collect(),
            chains: vec![(Vec::new(), Vec::new()); usize::from(size)],
        })
    }

    /// Writes descriptor `i`.
    pub fn write_desc(&self, mem: &GuestRam, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, self.desc.unchecked_add(16 * u64::from(i)))
            .expect("descriptor in guest RAM");
    }

    /// Builds a chain of `bufs` on free descriptors and puts its head in the avail ring (not
    /// yet published: see [`Ring::publish`]).
    pub fn post(&mut self, mem: &GuestRam, bufs: &[Buf]) -> u16 {
        assert!(
            !bufs.is_empty() && self.free.len() >= bufs.len(),
            "ring full"
        );
        let idx: Vec<u16> = (0..bufs.len())
            .filter_map(|_| self.free.pop_front())
            .collect();
        for (k, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { DESC_F_WRITE } else { 0 };
            let next = idx.get(k + 1).copied().unwrap_or(0);
            if k + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(mem, idx[k], b.addr, b.len, flags, next);
        }
        let head = idx[0];
        self.chains[usize::from(head)] = (idx, bufs.to_vec());
        self.push_head(mem, head);
        head
    }

    fn push_head(&mut self, mem: &GuestRam, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), self.avail.unchecked_add(4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes posted heads and kicks if the device wants a kick (EVENT_IDX or flags).
    pub fn publish(&mut self, mem: &GuestRam) {
        fence(Ordering::Release);
        mem.store(
            self.avail_idx.to_le(),
            self.avail.unchecked_add(2),
            Ordering::Release,
        )
        .expect("avail idx");
        fence(Ordering::SeqCst);
        let (old, new) = (self.kicked_idx, self.avail_idx);
        self.kicked_idx = new;
        let kick = if self.event_idx {
            let at = self.used.unchecked_add(4 + 8 * u64::from(self.size));
            let event = u16::from_le(mem.load(at, Ordering::Acquire).expect("avail_event"));
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags = u16::from_le(mem.load(self.used, Ordering::Acquire).expect("flags"));
            flags & 1 == 0
        };
        if kick {
            self.kick.write(1).expect("kick");
        }
    }

    /// Publishes and kicks whatever the device asked for.
    pub fn publish_and_kick(&mut self, mem: &GuestRam) {
        self.publish(mem);
        self.kick.write(1).expect("kick");
    }

    pub fn used_idx(&self, mem: &GuestRam) -> u16 {
        u16::from_le(
            mem.load(self.used.unchecked_add(2), Ordering::Acquire)
                .expect("used idx"),
        )
    }

    /// Every new used entry as `(head, len, buffers of the chain)`; frees the chains.
    pub fn take_used(&mut self, mem: &GuestRam) -> Vec<(u16, u32, Vec<Buf>)> {
        let end = self.used_idx(mem);
        let mut out = Vec::new();
        while self.last_used != end {
            let at = self
                .used
                .unchecked_add(4 + 8 * u64::from(self.last_used % self.size));
            let id = u32::from_le(mem.read_obj(at).expect("used elem"));
            let len = u32::from_le(mem.read_obj(at.unchecked_add(4)).expect("used elem"));
            let head = u16::try_from(id).expect("head");
            let (descs, bufs) = std::mem::take(&mut self.chains[usize::from(head)]);
            self.free.extend(descs);
            out.push((head, len, bufs));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Waits until the device used something new (or `timeout`); true if it did.
    pub fn wait(&mut self, mem: &GuestRam, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.event_idx {
                let at = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
                mem.store(self.last_used.to_le(), at, Ordering::Release)
                    .expect("used_event");
                fence(Ordering::SeqCst);
            }
            if self.used_idx(mem) != self.last_used {
                let _ = self.call.read();
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let ms = i32::try_from(left.as_millis().clamp(1, 1000)).unwrap_or(1000);
            let mut events = [EpollEvent::default()];
            match self.call_watch.wait(ms, &mut events) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("waiting on the call eventfd: {e}"),
            }
            let _ = self.call.read();
        }
    }

    /// Waits until `n` used entries have arrived (or `timeout`), and returns them.
    pub fn collect(
        &mut self,
        mem: &GuestRam,
        n: usize,
        timeout: Duration,
    ) -> Vec<(u16, u32, Vec<Buf>)> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            out.extend(self.take_used(mem));
            if out.len() >= n {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.wait(mem, left) {
                out.extend(self.take_used(mem));
                break;
            }
        }
        out
    }

    /// Chains posted and not yet used.
    pub fn outstanding(&self) -> usize {
        usize::from(self.avail_idx.wrapping_sub(self.last_used))
    }
}

/// A frame as the guest received it.
#[derive(Clone, Debug)]
pub struct RxFrame {
    pub header: [u8; 12],
    pub frame: Vec<u8>,
    /// Used entries it took.
    pub buffers: usize,
}

impl RxFrame {
    pub fn num_buffers(&self) -> u16 {
        u16::from_le_bytes([self.header[10], self.header[11]])
    }
}

// ---------------------------------------------------------------------------------------------
// The device

/// How to set the device up.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub pairs: usize,
    pub queue_size: u16,
    /// Features wanted (intersected with the offer; PROTOCOL_FEATURES is added).
    pub features: u64,
    /// Pairs enabled at start (the core enables pair 0 only and the rest on demand).
    pub enabled_pairs: usize,
    pub mem_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            pairs: 1,
            queue_size: 256,
            features: F_VERSION_1 | F_MRG_RXBUF | F_EVENT_IDX | F_MAC | F_STATUS | F_MQ,
            enabled_pairs: usize::MAX,
            mem_size: 64 << 20,
        }
    }
}

/// A connected, set-up vhost-user-net device.
pub struct Net {
    pub fe: Frontend,
    pub mem: GuestRam,
    pub rings: Vec<Ring>,
    pub offered: u64,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    pub queue_num: u64,
    next_buf: u64,
    /// Used receive entries of a frame whose other buffers have not arrived yet, per pair.
    rx_pending: Vec<VecDeque<(u16, u32, Vec<Buf>)>>,
}

/// Connects to `path`, retrying while the backend starts.
pub fn connect_stream(path: &Path, timeout: Duration) -> anyhow::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
        }
    }
}

impl Net {
    pub fn connect(path: &Path, opts: Options) -> anyhow::Result<Self> {
        let stream = connect_stream(path, Duration::from_secs(10))?;
        let queues = 2 * opts.pairs;
        let mut fe = Frontend::from_stream(stream, u64::try_from(queues)?);
        fe.set_owner().context("SET_OWNER")?;
        let offered = fe.get_features().context("GET_FEATURES")?;
        ensure!(offered & F_PROTOCOL_FEATURES != 0, "no protocol features");
        let pf = fe
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        let protocol_features = pf
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_protocol_features(protocol_features)
            .context("SET_PROTOCOL_FEATURES")?;
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let queue_num = fe.get_queue_num().context("GET_QUEUE_NUM")?;
        ensure!(
            queue_num >= u64::try_from(queues)?,
            "{queue_num} queues, {queues} wanted"
        );
        let features = (offered & opts.features) | F_PROTOCOL_FEATURES;
        fe.set_features(features).context("SET_FEATURES")?;
        let mem = memfd_ram(opts.mem_size)?;
        let mut net = Self {
            fe,
            mem,
            rings: Vec::new(),
            offered,
            features,
            protocol_features,
            queue_num,
            next_buf: BUFFER_BASE,
            rx_pending: (0..opts.pairs).map(|_| VecDeque::new()).collect(),
        };
        net.set_mem_table()?;
        for i in 0..queues {
            let ring = Ring::new(i, opts.queue_size, features & F_EVENT_IDX != 0)?;
            net.start_ring(&ring, 0, i / 2 < opts.enabled_pairs)?;
            net.rings.push(ring);
        }
        Ok(net)
    }

    fn set_mem_table(&mut self) -> anyhow::Result<()> {
        let regions = self
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .context("describing guest RAM")?;
        self.fe.set_mem_table(&regions).context("SET_MEM_TABLE")?;
        Ok(())
    }

    fn start_ring(&mut self, ring: &Ring, base: u16, enable: bool) -> anyhow::Result<()> {
        let hva = |a: GuestAddress| -> anyhow::Result<u64> {
            Ok(self.mem.get_host_address(a).context("ring address")? as u64)
        };
        let i = ring.index;
        self.fe
            .set_vring_num(i, ring.size)
            .context("SET_VRING_NUM")?;
        self.fe
            .set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: ring.size,
                    queue_size: ring.size,
                    flags: 0,
                    desc_table_addr: hva(ring.desc)?,
                    used_ring_addr: hva(ring.used)?,
                    avail_ring_addr: hva(ring.avail)?,
                    log_addr: None,
                },
            )
            .context("SET_VRING_ADDR")?;
        self.fe.set_vring_base(i, base).context("SET_VRING_BASE")?;
        self.fe
            .set_vring_call(i, &ring.call)
            .context("SET_VRING_CALL")?;
        self.fe
            .set_vring_kick(i, &ring.kick)
            .context("SET_VRING_KICK")?;
        if enable {
            self.fe
                .set_vring_enable(i, true)
                .context("SET_VRING_ENABLE")?;
        }
        Ok(())
    }

    /// Enables or disables both rings of `pair` (what the core does for
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`).
    pub fn set_pair_enabled(&mut self, pair: usize, on: bool) -> anyhow::Result<()> {
        self.fe.set_vring_enable(2 * pair, on)?;
        self.fe.set_vring_enable(2 * pair + 1, on)?;
        Ok(())
    }

    /// Reconnects after the backend went away, as vmm-core does after a crash: the same guest
    /// RAM, rings and eventfds; every ring resumes at the guest's `used.idx`, then is kicked.
    pub fn resume(&mut self, path: &Path) -> anyhow::Result<()> {
        let stream = connect_stream(path, Duration::from_secs(10))?;
        let mut fe = Frontend::from_stream(stream, u64::try_from(self.rings.len())?);
        fe.set_owner().context("SET_OWNER")?;
        let offered = fe.get_features().context("GET_FEATURES")?;
        ensure!(
            offered & self.features == self.features,
            "feature set shrank"
        );
        fe.get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        fe.set_protocol_features(self.protocol_features)
            .context("SET_PROTOCOL_FEATURES")?;
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_features(self.features).context("SET_FEATURES")?;
        self.fe = fe;
        self.set_mem_table()?;
        let rings = std::mem::take(&mut self.rings);
        for ring in &rings {
            let base = ring.used_idx(&self.mem);
            self.start_ring(ring, base, true)?;
        }
        self.rings = rings;
        for ring in &self.rings {
            ring.kick.write(1)?;
        }
        Ok(())
    }

    /// The whole config space (24 bytes).
    pub fn config(&mut self) -> anyhow::Result<Vec<u8>> {
        let (_, c) = self
            .fe
            .get_config(0, 24, VhostUserConfigFlags::WRITABLE, &[0u8; 24])
            .context("GET_CONFIG")?;
        Ok(c)
    }

    /// Allocates `len` bytes of guest RAM (4 KiB aligned) filled with `fill`.
    pub fn alloc(&mut self, len: u64, fill: u8) -> u64 {
        let at = self.next_buf;
        let end = at + len.div_ceil(4096) * 4096;
        assert!(
            end <= self.mem.last_addr().raw_value(),
            "test guest RAM exhausted"
        );
        self.next_buf = end;
        let buf = vec![fill; usize::try_from(len).unwrap()];
        self.mem.write_slice(&buf, GuestAddress(at)).expect("fill");
        at
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read guest RAM");
        v
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("write guest RAM");
    }

    /// Posts `n` receive buffers of `len` bytes each on pair `pair` and publishes them.
    pub fn post_rx(&mut self, pair: usize, n: usize, len: u32) {
        for _ in 0..n {
            let addr = self.alloc(u64::from(len), 0xee);
            let mem = self.mem.clone();
            self.rings[2 * pair].post(
                &mem,
                &[Buf {
                    addr,
                    len,
                    write: true,
                }],
            );
        }
        let mem = self.mem.clone();
        self.rings[2 * pair].publish(&mem);
    }

    /// Posts a transmit chain holding `header ++ frame`, cut into pieces of `split` bytes
    /// (the rest in a last piece), and publishes it. Returns the head.
    pub fn post_tx(&mut self, pair: usize, header: &[u8], frame: &[u8], split: &[usize]) -> u16 {
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(frame);
        let mut bufs = Vec::new();
        let mut at = 0;
        for len in split.iter().copied().chain([usize::MAX]) {
            if at >= bytes.len() {
                break;
            }
            let n = len.min(bytes.len() - at);
            let addr = self.alloc(u64::try_from(n).unwrap(), 0);
            self.write(addr, &bytes[at..at + n]);
            bufs.push(Buf {
                addr,
                len: u32::try_from(n).unwrap(),
                write: false,
            });
            at += n;
        }
        let mem = self.mem.clone();
        let ring = &mut self.rings[2 * pair + 1];
        let head = ring.post(&mem, &bufs);
        ring.publish(&mem);
        head
    }

    /// Posts a raw chain of `bufs` on queue `q` and publishes it.
    pub fn post_raw(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let mem = self.mem.clone();
        let ring = &mut self.rings[q];
        let head = ring.post(&mem, bufs);
        ring.publish(&mem);
        head
    }

    /// Waits for `n` transmit completions on pair `pair`.
    pub fn tx_done(&mut self, pair: usize, n: usize) -> Vec<(u16, u32)> {
        let mem = self.mem.clone();
        self.rings[2 * pair + 1]
            .collect(&mem, n, Duration::from_secs(5))
            .into_iter()
            .map(|(h, l, _)| (h, l))
            .collect()
    }

    /// Waits for up to `n` frames on pair `pair`'s receive ring (or `timeout`), reassembling
    /// mergeable buffers; entries of length 0 (buffers returned unused) come back as frames
    /// with `buffers == 1` and an empty frame.
    pub fn rx_frames(&mut self, pair: usize, n: usize, timeout: Duration) -> Vec<RxFrame> {
        let mem = self.mem.clone();
        let mrg = self.features & F_MRG_RXBUF != 0;
        let ring = &mut self.rings[2 * pair];
        let deadline = Instant::now() + timeout;
        let entries = &mut self.rx_pending[pair];
        let mut frames = Vec::new();
        while frames.len() < n {
            entries.extend(ring.take_used(&mem));
            while let Some((_, len, bufs)) = entries.front().cloned() {
                let data = read_chain(&mem, &bufs, len);
                let mut header = [0u8; 12];
                if data.len() < 12 {
                    entries.pop_front();
                    frames.push(RxFrame {
                        header,
                        frame: Vec::new(),
                        buffers: 1,
                    });
                    continue;
                }
                header.copy_from_slice(&data[..12]);
                let count = if mrg {
                    usize::from(u16::from_le_bytes([header[10], header[11]])).max(1)
                } else {
                    1
                };
                if entries.len() < count {
                    break;
                }
                let mut frame = data[12..].to_vec();
                entries.pop_front();
                for _ in 1..count {
                    let (_, l, b) = entries.pop_front().unwrap();
                    frame.extend(read_chain(&mem, &b, l));
                }
                frames.push(RxFrame {
                    header,
                    frame,
                    buffers: count,
                });
            }
            if frames.len() >= n {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !ring.wait(&mem, left) {
                break;
            }
        }
        frames
    }
}

/// The first `len` bytes written into the buffers of a chain.
fn read_chain(mem: &GuestRam, bufs: &[Buf], len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut left = usize::try_from(len).unwrap();
    for b in bufs {
        let n = left.min(usize::try_from(b.len).unwrap());
        let mut v = vec![0u8; n];
        mem.read_slice(&mut v, GuestAddress(b.addr)).unwrap();
        out.extend(v);
        left -= n;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The backend process

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "dev-net-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self(path)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A dev-net process, killed on drop; its stderr goes to a file.
pub struct Backend {
    pub child: Child,
    pub log: PathBuf,
}

impl Backend {
    /// Starts `dev-net args...` (from the calling thread, so in its network namespace), logging
    /// at INFO into `log`.
    pub fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let file = File::create(log)?;
        cmd.env(
            "ATOLL_LOG",
            std::env::var("DEV_NET_LOG").unwrap_or_else(|_| "info".to_owned()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
        // Only stdio: descriptors the test harness inherited (cargo's jobserver pipes) must not
        // reach dev-net, whose lockdown warns about every descriptor it was not told of.
        let child = ipc::spawn::spawn_with_fds(cmd, &[]).context("spawning dev-net")?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn standalone(dir: &TempDir, args: &[&str]) -> anyhow::Result<(Self, PathBuf)> {
        let sock = dir.path("net.sock");
        let mut cmd = Command::new(BIN);
        cmd.arg("--socket").arg(&sock).args(args);
        Ok((Self::spawn(&mut cmd, &dir.path("dev-net.log"))?, sock))
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, sig).expect("signal our child");
    }

    /// Waits for the process to end on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("dev-net did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, a clean exit, and the log it wrote.
    pub fn stop(&mut self) -> anyhow::Result<String> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(5))?;
        let log = self.log_text();
        ensure!(status.success(), "dev-net exited with {status:?}:\n{log}");
        Ok(log)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The CPU time (user + system, in clock ticks) the process used so far.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("read /proc/<pid>/stat");
        // Fields after the command name (which is in parentheses): state is field 3, utime 14,
        // stime 15.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The counter lines dev-net logs at exit for `pair` and `queue` ("rx"/"tx").
pub fn counters<'a>(log: &'a str, pair: u16, queue: &str) -> &'a str {
    let tag = format!("{queue}: ");
    log.lines()
        .find(|l| l.contains(&format!("pair={pair}")) && l.contains(&tag))
        .unwrap_or_else(|| panic!("no {queue} counters for pair {pair} in:\n{log}"))
}
