//! A test vhost-user-blk frontend: it owns a memfd "guest RAM", lays out split virtqueues in it,
//! drives a backend over its socket with `vhost::vhost_user::Frontend`, and plays the virtio-blk
//! driver. Shared by the process tests and the benchmark (which includes this file by path).

#![allow(dead_code, reason = "each test binary uses a different subset")]
#![forbid(unsafe_code)]

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

// virtio constants (kept local so the driver does not depend on the device's crate).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Where buffers start in guest RAM (rings live below).
const BUFFER_BASE: u64 = 1 << 20;
/// Bytes of guest RAM reserved per queue for its rings.
const RING_AREA: u64 = 0x4000;

/// One buffer of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Buf {
    pub fn r(addr: GuestAddress, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    pub fn w(addr: GuestAddress, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// A split virtqueue as the driver sees it.
pub struct VirtQueue {
    pub index: usize,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub kick: EventFd,
    pub call: EventFd,
    /// Watches `call` (an epoll set, because `EventFd` cannot lend a `BorrowedFd` for `poll`).
    call_watch: Epoll,
    pub event_idx: bool,
    /// Next avail index the driver will publish.
    avail_idx: u16,
    /// Avail index at the last kick decision.
    kicked_idx: u16,
    /// Used entries consumed so far.
    last_used: u16,
    free: Vec<u16>,
    /// Descriptor indices of each in-flight chain, by head.
    chains: Vec<Vec<u16>>,
}

impl VirtQueue {
    fn new(index: usize, size: u16, base: GuestAddress, event_idx: bool) -> anyhow::Result<Self> {
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
            free: (0..size).rev().collect(),
            chains: (0..size).map(|_| Vec::with_capacity(8)).collect(),
        })
    }

    /// Writes descriptor `i`.
    pub fn write_desc(&self, mem: &GuestRam, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc.unchecked_add(16 * u64::from(i));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at)
            .expect("descriptor inside guest RAM");
    }

    /// Takes `n` descriptors off the free list for the caller to manage.
    pub fn reserve(&mut self, n: usize) -> Option<Vec<u16>> {
        if self.free.len() < n {
            return None;
        }
        Some((0..n).filter_map(|_| self.free.pop()).collect())
    }

    /// Builds a chain from `bufs` on free descriptors and puts its head in the avail ring
    /// (not yet published). Returns the head.
    pub fn push(&mut self, mem: &GuestRam, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || self.free.len() < bufs.len() {
            return None;
        }
        let start = self.free.len() - bufs.len();
        let idx: Vec<u16> = self.free.drain(start..).rev().collect();
        for (k, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { DESC_F_WRITE } else { 0 };
            let next = if k + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
                idx[k + 1]
            } else {
                0
            };
            self.write_desc(mem, idx[k], b.addr.raw_value(), b.len, flags, next);
        }
        let head = idx[0];
        self.chains[usize::from(head)].clear();
        self.chains[usize::from(head)].extend_from_slice(&idx);
        self.push_head(mem, head);
        Some(head)
    }

    /// Puts `head` in the avail ring; `chain` lists the descriptors to free on completion.
    pub fn push_raw(&mut self, mem: &GuestRam, head: u16, chain: &[u16]) {
        if let Some(c) = self.chains.get_mut(usize::from(head)) {
            c.clear();
            c.extend_from_slice(chain);
        }
        self.push_head(mem, head);
    }

    /// Puts `head` in the avail ring without any bookkeeping (fixed descriptors).
    pub fn push_head(&mut self, mem: &GuestRam, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), self.avail.unchecked_add(4 + 2 * slot))
            .expect("avail ring inside guest RAM");
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes pushed heads (avail.idx) and kicks if the device wants it.
    pub fn notify(&mut self, mem: &GuestRam) {
        fence(Ordering::Release);
        mem.store(
            self.avail_idx.to_le(),
            self.avail.unchecked_add(2),
            Ordering::Release,
        )
        .expect("avail idx");
        fence(Ordering::SeqCst);
        let old = self.kicked_idx;
        let new = self.avail_idx;
        self.kicked_idx = new;
        let kick = if self.event_idx {
            let at = self.used.unchecked_add(4 + 8 * u64::from(self.size));
            let avail_event: u16 =
                u16::from_le(mem.load(at, Ordering::Acquire).expect("avail_event"));
            // vring_need_event(event, new, old)
            new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 =
                u16::from_le(mem.load(self.used, Ordering::Acquire).expect("used flags"));
            flags & 1 == 0
        };
        if kick {
            self.kick.write(1).expect("kick");
        }
    }

    /// Publishes and kicks unconditionally.
    pub fn notify_always(&mut self, mem: &GuestRam) {
        fence(Ordering::Release);
        mem.store(
            self.avail_idx.to_le(),
            self.avail.unchecked_add(2),
            Ordering::Release,
        )
        .expect("avail idx");
        self.kicked_idx = self.avail_idx;
        self.kick.write(1).expect("kick");
    }

    pub fn used_idx(&self, mem: &GuestRam) -> u16 {
        u16::from_le(
            mem.load(self.used.unchecked_add(2), Ordering::Acquire)
                .expect("used idx"),
        )
    }

    /// Calls `f(id, len)` for every new used entry, frees the chains, and returns how many.
    pub fn for_each_used(&mut self, mem: &GuestRam, mut f: impl FnMut(u16, u32)) -> usize {
        let end = self.used_idx(mem);
        let mut n = 0;
        while self.last_used != end {
            let slot = u64::from(self.last_used % self.size);
            let at = self.used.unchecked_add(4 + 8 * slot);
            let id: u32 = mem.read_obj(at).expect("used elem");
            let len: u32 = mem.read_obj(at.unchecked_add(4)).expect("used elem");
            let id = u16::try_from(u32::from_le(id)).unwrap_or(u16::MAX);
            if let Some(chain) = self.chains.get_mut(usize::from(id)) {
                self.free.extend(chain.drain(..).rev());
            }
            f(id, u32::from_le(len));
            self.last_used = self.last_used.wrapping_add(1);
            n += 1;
        }
        n
    }

    /// Waits until the device has used something new (or `timeout`); true if so.
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
            let ms = i32::try_from(left.as_millis().clamp(1, 10_000)).unwrap_or(10_000);
            let mut events = [EpollEvent::default()];
            match self.call_watch.wait(ms, &mut events) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("waiting on the call eventfd: {e}"),
            }
            let _ = self.call.read();
        }
    }

    /// Waits for and collects every new used entry as `(head, len)`.
    pub fn collect(&mut self, mem: &GuestRam, timeout: Duration) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        if self.wait(mem, timeout) {
            self.for_each_used(mem, |id, len| out.push((id, len)));
        }
        out
    }
}

/// How to set the device up.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub queues: usize,
    pub queue_size: u16,
    pub event_idx: bool,
    pub mem_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            queues: 1,
            queue_size: 256,
            event_idx: false,
            mem_size: 64 << 20,
        }
    }
}

/// A connected, fully set-up vhost-user-blk device.
pub struct Device {
    pub fe: Frontend,
    pub mem: GuestRam,
    pub queues: Vec<VirtQueue>,
    pub device_features: u64,
    pub features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    pub offered_protocol_features: VhostUserProtocolFeatures,
    pub config: Vec<u8>,
    next_buf: u64,
}

/// Creates guest RAM backed by a memfd (so it can be shared through `SET_MEM_TABLE`).
pub fn memfd_ram(size: usize) -> anyhow::Result<GuestRam> {
    let fd = memfd_create("guest-ram", MFdFlags::MFD_CLOEXEC).context("memfd_create")?;
    let file = File::from(fd);
    file.set_len(u64::try_from(size)?)?;
    let mem =
        GuestRam::from_ranges_with_files([(GuestAddress(0), size, Some(FileOffset::new(file, 0)))])
            .context("mapping guest RAM")?;
    Ok(mem)
}

/// Connects to `path`, retrying while the backend is starting.
pub fn connect_stream(path: &Path, timeout: Duration) -> anyhow::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
        }
    }
}

impl Device {
    /// Connects to the backend at `path` and performs the whole bring-up.
    pub fn connect(path: &Path, opts: Options) -> anyhow::Result<Self> {
        let stream = connect_stream(path, Duration::from_secs(10))?;
        Self::setup(stream, opts)
    }

    /// Bring-up on an already connected stream (vhost-user spec order, like vmm-core).
    pub fn setup(stream: UnixStream, opts: Options) -> anyhow::Result<Self> {
        let mut fe = Frontend::from_stream(stream, u64::try_from(opts.queues)?);
        fe.set_owner().context("SET_OWNER")?;
        let device_features = fe.get_features().context("GET_FEATURES")?;
        ensure!(
            device_features & VHOST_USER_F_PROTOCOL_FEATURES != 0,
            "backend does not offer protocol features"
        );
        let pf = fe
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        let protocol_features = pf
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK);
        fe.set_protocol_features(protocol_features)
            .context("SET_PROTOCOL_FEATURES")?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let n = fe.get_queue_num().context("GET_QUEUE_NUM")?;
            ensure!(
                n >= u64::try_from(opts.queues)?,
                "backend has {n} queues, {} wanted",
                opts.queues
            );
        }
        let (_, config) = fe
            .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .context("GET_CONFIG")?;

        let mut wanted = VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_TOPOLOGY
            | VIRTIO_BLK_F_MQ
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES
            | VIRTIO_BLK_F_RO
            | VIRTIO_RING_F_INDIRECT_DESC;
        if opts.event_idx {
            wanted |= VIRTIO_RING_F_EVENT_IDX;
        }
        let features = (device_features & wanted) | VHOST_USER_F_PROTOCOL_FEATURES;
        ensure!(
            !opts.event_idx || features & VIRTIO_RING_F_EVENT_IDX != 0,
            "backend does not offer EVENT_IDX"
        );
        fe.set_features(features).context("SET_FEATURES")?;

        let mem = memfd_ram(opts.mem_size)?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .context("describing guest RAM")?;
        fe.set_mem_table(&regions).context("SET_MEM_TABLE")?;

        let mut queues = Vec::new();
        for i in 0..opts.queues {
            let base = GuestAddress(RING_AREA * u64::try_from(i)?);
            let q = VirtQueue::new(i, opts.queue_size, base, opts.event_idx)?;
            let hva = |a: GuestAddress| -> anyhow::Result<u64> {
                Ok(mem.get_host_address(a).context("ring address")? as u64)
            };
            fe.set_vring_num(i, opts.queue_size)
                .context("SET_VRING_NUM")?;
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: opts.queue_size,
                    queue_size: opts.queue_size,
                    flags: 0,
                    desc_table_addr: hva(q.desc)?,
                    used_ring_addr: hva(q.used)?,
                    avail_ring_addr: hva(q.avail)?,
                    log_addr: None,
                },
            )
            .context("SET_VRING_ADDR")?;
            fe.set_vring_base(i, 0).context("SET_VRING_BASE")?;
            fe.set_vring_call(i, &q.call).context("SET_VRING_CALL")?;
            fe.set_vring_kick(i, &q.kick).context("SET_VRING_KICK")?;
            fe.set_vring_enable(i, true).context("SET_VRING_ENABLE")?;
            queues.push(q);
        }
        Ok(Self {
            fe,
            mem,
            queues,
            device_features,
            features,
            protocol_features,
            offered_protocol_features: pf,
            config,
            next_buf: BUFFER_BASE,
        })
    }

    /// Reconnects after the backend went away, as vmm-core does after a backend crash: the
    /// same guest RAM, rings, eventfds and features; every ring resumes from the guest's
    /// `used.idx` (the backend completes in order), then every queue is kicked.
    pub fn resume(&mut self, path: &Path) -> anyhow::Result<()> {
        let stream = connect_stream(path, Duration::from_secs(10))?;
        let mut fe = Frontend::from_stream(stream, u64::try_from(self.queues.len())?);
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
        if self
            .protocol_features
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
        {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        fe.set_features(self.features).context("SET_FEATURES")?;
        let regions = self
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()?;
        fe.set_mem_table(&regions).context("SET_MEM_TABLE")?;
        for q in &self.queues {
            let hva = |a: GuestAddress| -> anyhow::Result<u64> {
                Ok(self.mem.get_host_address(a).context("ring address")? as u64)
            };
            fe.set_vring_num(q.index, q.size)?;
            fe.set_vring_addr(
                q.index,
                &VringConfigData {
                    queue_max_size: q.size,
                    queue_size: q.size,
                    flags: 0,
                    desc_table_addr: hva(q.desc)?,
                    used_ring_addr: hva(q.used)?,
                    avail_ring_addr: hva(q.avail)?,
                    log_addr: None,
                },
            )?;
            fe.set_vring_base(q.index, q.used_idx(&self.mem))?;
            fe.set_vring_call(q.index, &q.call)?;
            fe.set_vring_kick(q.index, &q.kick)?;
            fe.set_vring_enable(q.index, true)?;
        }
        for q in &self.queues {
            q.kick.write(1)?;
        }
        self.fe = fe;
        Ok(())
    }

    /// Capacity in sectors, from the config space.
    pub fn capacity(&self) -> u64 {
        u64::from_le_bytes(self.config[0..8].try_into().expect("8 bytes"))
    }

    /// Allocates `len` bytes of guest RAM (4 KiB aligned), filled with `fill`.
    pub fn alloc(&mut self, len: u64, fill: u8) -> GuestAddress {
        let at = self.next_buf;
        let end = at + len.div_ceil(4096) * 4096;
        assert!(
            end <= self.mem.last_addr().raw_value(),
            "test guest RAM exhausted"
        );
        self.next_buf = end;
        let buf = vec![fill; usize::try_from(len).expect("small")];
        self.mem.write_slice(&buf, GuestAddress(at)).expect("fill");
        GuestAddress(at)
    }

    /// Frees every buffer allocated so far.
    pub fn reset_buffers(&mut self) {
        self.next_buf = BUFFER_BASE;
    }

    /// Allocates a request header.
    pub fn header(&mut self, kind: u32, sector: u64) -> GuestAddress {
        let at = self.alloc(16, 0);
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&raw, at).expect("header");
        at
    }

    pub fn read_bytes(&self, at: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, at).expect("read guest RAM");
        v
    }

    pub fn write_bytes(&self, at: GuestAddress, data: &[u8]) {
        self.mem.write_slice(data, at).expect("write guest RAM");
    }

    pub fn byte(&self, at: GuestAddress) -> u8 {
        self.mem.read_obj(at).expect("read guest RAM")
    }

    /// Submits `bufs` on queue `q` and waits for exactly that chain; returns its used length.
    pub fn submit_and_wait(&mut self, q: usize, bufs: &[Buf]) -> anyhow::Result<u32> {
        let vq = &mut self.queues[q];
        let head = vq.push(&self.mem, bufs).context("queue full")?;
        vq.notify_always(&self.mem);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut found = None;
            vq.for_each_used(&self.mem, |id, len| {
                if id == head {
                    found = Some(len);
                }
            });
            if let Some(len) = found {
                return Ok(len);
            }
            if Instant::now() >= deadline {
                bail!("queue {q}: chain {head} not completed within 10 s");
            }
            vq.wait(&self.mem, Duration::from_millis(200));
        }
    }

    /// A well-formed request: header, optional data (device-writable for IN/GET_ID), status.
    /// Returns `(status, used_len, data_address)`.
    pub fn request(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        data: Option<&[u8]>,
        in_len: u32,
    ) -> anyhow::Result<(u8, u32, GuestAddress)> {
        let hdr = self.header(kind, sector);
        let status = self.alloc(1, 0xff);
        let mut bufs = vec![Buf::r(hdr, 16)];
        let data_at = match data {
            Some(bytes) => {
                let at = self.alloc(u64::try_from(bytes.len())?, 0);
                self.write_bytes(at, bytes);
                bufs.push(Buf::r(at, u32::try_from(bytes.len())?));
                at
            }
            None if in_len > 0 => {
                let at = self.alloc(u64::from(in_len), 0xee);
                bufs.push(Buf::w(at, in_len));
                at
            }
            None => GuestAddress(0),
        };
        bufs.push(Buf::w(status, 1));
        let used = self.submit_and_wait(q, &bufs)?;
        Ok((self.byte(status), used, data_at))
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "dev-blk-{tag}-{}-{}",
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

/// Writes an image of `len` bytes with a recognisable pattern.
pub fn make_image(path: &Path, len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..len)
        .map(|i| u8::try_from((i / 512 + i) % 251).expect("< 251"))
        .collect();
    std::fs::write(path, &data).expect("image");
    data
}

/// A backend process (dev-blk or qemu-storage-daemon) killed on drop.
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
}

impl Backend {
    /// Starts `dev-blk --socket <dir>/sock --image <image> <extra>`.
    pub fn dev_blk(
        bin: &Path,
        dir: &TempDir,
        image: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let socket = dir.path("dev-blk.sock");
        let child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(image)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("DEV_BLK_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        Ok(Self { child, socket })
    }

    /// Starts qemu-storage-daemon exporting `image` as vhost-user-blk.
    pub fn qsd(dir: &TempDir, image: &Path, queues: usize) -> anyhow::Result<Self> {
        let socket = dir.path("qsd.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={},cache.direct=off",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("spawning qemu-storage-daemon")?;
        Ok(Self { child, socket })
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("signal our own child");
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
