//! A relay between the frontend and the vhost-user daemon that absorbs `SET_VRING_ENABLE`
//! messages sent before `SET_FEATURES`.
//!
//! QEMU's vhost-user-net (`virtio_net_set_queue_pairs` -> `vhost_set_vring_enable`) enables or
//! disables the queue pairs as soon as the card is realized, before any `SET_FEATURES`, and
//! sends the enable again once the device starts. The `vhost` crate (0.18) refuses
//! `SET_VRING_ENABLE` until `VHOST_USER_F_PROTOCOL_FEATURES` has been acked by `SET_FEATURES`
//! and ends the connection, so QEMU could not use dev-net at all. No setting of the crates
//! changes that, hence this hand-written relay: every message is passed on unchanged (with its
//! descriptors) except an early `SET_VRING_ENABLE`, which is acknowledged here when the
//! frontend asked for a reply, remembered, and passed on right after `SET_FEATURES` (without
//! asking for a reply), so the rings end up enabled exactly as the frontend said. QEMU does
//! not send the enable again when the device starts.
//!
//! The daemon accepts on a private listening socket in the abstract namespace (no file, and
//! in the network namespace atoll gives dev-net nobody else sees it). Lockdown's Landlock
//! domain forbids connecting to abstract sockets made outside it, so [`POOL`] connections
//! are made before lockdown and wait in the socket's backlog; each frontend connection uses
//! the next one. (A dev-net serves one frontend at a time and a restarted dev-net gets a
//! fresh pool, so the pool runs out only after that many reconnections to one process;
//! later ones are refused with an error.)

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ipc::fdpass::{FdPassError, recv_with_fds, send_with_fds};
use tracing::debug;

/// vhost-user message header: request, flags, payload size (all u32, native endian).
const HEADER: usize = 12;
/// The largest payload the protocol allows.
const MAX_PAYLOAD: usize = 0x1000;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("cannot create the daemon's private socket {name:?}")]
    Bind {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the daemon's private socket")]
    Connect(#[source] std::io::Error),
    #[error("cannot start a relay thread")]
    Thread(#[source] std::io::Error),
    #[error("all {0} connections to the daemon made before lockdown are used up")]
    Exhausted(usize),
}

/// Connections made ahead of lockdown.
pub const POOL: usize = 32;

/// The daemon's side: a listening socket in the abstract namespace, and the relay's ends of
/// connections to it made in advance.
pub struct Inner {
    listener: UnixListener,
    pool: std::sync::Mutex<Vec<UnixStream>>,
}

impl Inner {
    /// Creates the private listening socket (before lockdown: it needs `bind`).
    pub fn bind() -> Result<Self, RelayError> {
        let name = format!(
            "atoll-dev-net-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let bind_err = |source| RelayError::Bind {
            name: name.clone(),
            source,
        };
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(bind_err)?;
        let listener = UnixListener::bind_addr(&addr).map_err(bind_err)?;
        let pool = (0..POOL)
            .map(|_| UnixStream::connect_addr(&addr).map_err(RelayError::Connect))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            listener,
            pool: std::sync::Mutex::new(pool),
        })
    }

    /// The descriptors it holds (for lockdown's list).
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let pool = self.pool.lock().expect("relay pool lock poisoned");
        std::iter::once(self.listener.as_raw_fd())
            .chain(pool.iter().map(AsRawFd::as_raw_fd))
            .collect()
    }

    /// The listening socket, for the daemon's `Listener`.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Starts relaying `frontend` to a new connection to the daemon; returns at once. The
    /// relay ends when either side closes, closing the other.
    pub fn relay(&self, frontend: UnixStream) -> Result<(), RelayError> {
        // First in, first accepted: the daemon's next accept gets this connection.
        let daemon = {
            let mut pool = self.pool.lock().expect("relay pool lock poisoned");
            if pool.is_empty() {
                return Err(RelayError::Exhausted(POOL));
            }
            pool.remove(0)
        };
        let features_set = Arc::new(AtomicBool::new(false));
        let (f2, d2) = (
            frontend.try_clone().map_err(RelayError::Connect)?,
            daemon.try_clone().map_err(RelayError::Connect)?,
        );
        std::thread::Builder::new()
            .name("relay-to-daemon".into())
            .spawn(move || {
                let _ = pump(&frontend, &daemon, Some(&features_set));
                let _ = frontend.shutdown(std::net::Shutdown::Both);
                let _ = daemon.shutdown(std::net::Shutdown::Both);
            })
            .map_err(RelayError::Thread)?;
        std::thread::Builder::new()
            .name("relay-to-frontend".into())
            .spawn(move || {
                let _ = pump(&d2, &f2, None);
                let _ = f2.shutdown(std::net::Shutdown::Both);
                let _ = d2.shutdown(std::net::Shutdown::Both);
            })
            .map_err(RelayError::Thread)?;
        Ok(())
    }
}

/// One message: header, payload and the descriptors that came with it.
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn field(&self, i: usize) -> u32 {
        let at = 4 * i;
        u32::from_ne_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes"))
    }
}

/// Reads one whole message from a stream socket; `None` at a clean end of stream.
fn read_message(from: &UnixStream) -> Result<Option<Message>, FdPassError> {
    let mut header = [0u8; HEADER];
    let (n, fds) = match recv_with_fds(from.as_fd(), &mut header) {
        Ok(r) => r,
        Err(FdPassError::Closed) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut stream = from;
    stream
        .read_exact(&mut header[n..])
        .map_err(|e| FdPassError::Recv(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?;
    let size = usize::try_from(u32::from_ne_bytes(
        header[8..12].try_into().expect("4 bytes"),
    ))
    .unwrap_or(usize::MAX);
    if size > MAX_PAYLOAD {
        return Err(FdPassError::Truncated(size));
    }
    let mut bytes = header.to_vec();
    bytes.resize(HEADER + size, 0);
    stream
        .read_exact(&mut bytes[HEADER..])
        .map_err(|e| FdPassError::Recv(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?;
    Ok(Some(Message { bytes, fds }))
}

/// Passes messages from `from` to `to` until either side fails. With `features_set` (the
/// frontend-to-daemon direction) it absorbs `SET_VRING_ENABLE` until `SET_FEATURES` passed.
fn pump(
    from: &UnixStream,
    to: &UnixStream,
    features_set: Option<&AtomicBool>,
) -> Result<(), FdPassError> {
    // Early enables, replayed after SET_FEATURES.
    let mut held: Vec<Vec<u8>> = Vec::new();
    while let Some(msg) = read_message(from)? {
        if let Some(set) = features_set {
            match msg.field(0) {
                SET_FEATURES if !set.load(Ordering::Acquire) => {
                    set.store(true, Ordering::Release);
                    let fds: Vec<BorrowedFd<'_>> = msg.fds.iter().map(AsFd::as_fd).collect();
                    send_with_fds(to.as_fd(), &msg.bytes, &fds)?;
                    for mut enable in held.drain(..) {
                        enable[4..8].copy_from_slice(&FLAG_VERSION.to_ne_bytes());
                        send_with_fds(to.as_fd(), &enable, &[])?;
                    }
                    continue;
                }
                SET_VRING_ENABLE if !set.load(Ordering::Acquire) => {
                    debug!("SET_VRING_ENABLE before SET_FEATURES held until SET_FEATURES");
                    held.push(msg.bytes.clone());
                    if msg.field(1) & FLAG_NEED_REPLY != 0 {
                        let mut reply = Vec::with_capacity(HEADER + 8);
                        reply.extend_from_slice(&SET_VRING_ENABLE.to_ne_bytes());
                        reply.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_ne_bytes());
                        reply.extend_from_slice(&8u32.to_ne_bytes());
                        reply.extend_from_slice(&0u64.to_ne_bytes());
                        let mut back = from;
                        back.write_all(&reply).map_err(|e| {
                            FdPassError::Recv(nix::Error::from_raw(e.raw_os_error().unwrap_or(0)))
                        })?;
                    }
                    continue;
                }
                _ => {}
            }
        }
        let fds: Vec<BorrowedFd<'_>> = msg.fds.iter().map(AsFd::as_fd).collect();
        send_with_fds(to.as_fd(), &msg.bytes, &fds)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_ne_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).unwrap();
        b
    }

    #[test]
    fn early_enable_is_absorbed_and_acked_everything_else_passes() {
        let inner = Inner::bind().unwrap();
        let (mut vmm, relay_end) = UnixStream::pair().unwrap();
        inner.relay(relay_end).unwrap();
        let (mut daemon, _) = inner.listener().accept().unwrap();

        let enable = msg(SET_VRING_ENABLE, FLAG_VERSION | FLAG_NEED_REPLY, &[0; 8]);
        vmm.write_all(&enable).unwrap();
        // The relay answers the early enable itself.
        let reply = read_n(&mut vmm, HEADER + 8);
        assert_eq!(reply[..4], SET_VRING_ENABLE.to_ne_bytes());
        assert_eq!(reply[4..8], (FLAG_VERSION | FLAG_REPLY).to_ne_bytes());
        assert_eq!(reply[12..], 0u64.to_ne_bytes());

        // A message with a descriptor, split over two writes, arrives whole with it.
        let (keep, pass) = UnixStream::pair().unwrap();
        let features = msg(SET_FEATURES, FLAG_VERSION, &7u64.to_ne_bytes());
        send_with_fds(vmm.as_fd(), &features[..5], &[pass.as_fd()]).unwrap();
        vmm.write_all(&features[5..]).unwrap();
        let mut got = vec![0u8; features.len()];
        let (n, fds) = recv_with_fds(daemon.as_fd(), &mut got).unwrap();
        daemon.read_exact(&mut got[n..]).unwrap();
        assert_eq!(got, features);
        assert_eq!(fds.len(), 1);
        drop(keep);

        // The early enable follows SET_FEATURES, without asking for a reply.
        let mut replayed = enable.clone();
        replayed[4..8].copy_from_slice(&FLAG_VERSION.to_ne_bytes());
        assert_eq!(read_n(&mut daemon, replayed.len()), replayed);

        // After SET_FEATURES, enables pass through, and replies flow back.
        vmm.write_all(&enable).unwrap();
        assert_eq!(read_n(&mut daemon, enable.len()), enable);
        let answer = msg(SET_VRING_ENABLE, FLAG_VERSION | FLAG_REPLY, &[0; 8]);
        daemon.write_all(&answer).unwrap();
        assert_eq!(read_n(&mut vmm, answer.len()), answer);

        // Closing the frontend closes the daemon's side.
        drop(vmm);
        assert_eq!(daemon.read(&mut [0u8; 1]).unwrap(), 0);
    }
}
