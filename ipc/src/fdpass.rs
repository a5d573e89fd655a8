//! Sending and receiving a byte payload with attached file descriptors (`SCM_RIGHTS`).
//!
//! Works on any connected UNIX socket; with `SOCK_SEQPACKET` one call is one message.

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The most descriptors one message may carry (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 32;

/// Errors of fd passing.
#[derive(Debug, thiserror::Error)]
pub enum FdPassError {
    #[error("sendmsg failed")]
    Send(#[source] nix::Error),
    #[error("recvmsg failed")]
    Recv(#[source] nix::Error),
    #[error("message of {len} bytes was sent only partially ({sent} bytes)")]
    ShortSend { len: usize, sent: usize },
    #[error("received message was truncated (buffer of {0} bytes too small or too many fds)")]
    Truncated(usize),
    #[error("{0} descriptors exceed the per-message limit of {MAX_FDS}")]
    TooManyFds(usize),
    #[error("peer closed the socket")]
    Closed,
}

/// Sends `bytes` with `fds` attached as one message.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), FdPassError> {
    if fds.len() > MAX_FDS {
        return Err(FdPassError::TooManyFds(fds.len()));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let sent = loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::Error::EINTR) => continue,
            r => break r.map_err(FdPassError::Send)?,
        }
    };
    if sent != bytes.len() {
        return Err(FdPassError::ShortSend {
            len: bytes.len(),
            sent,
        });
    }
    Ok(())
}

/// Receives one message into `buf`, returning its length and the descriptors that came with it
/// (close-on-exec set). A zero-length read on a socket whose peer has gone is [`FdPassError::Closed`].
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Vec<OwnedFd>), FdPassError> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; MAX_FDS]);
    let buf_len = buf.len();
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            sock.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::Error::EINTR) => continue,
            r => break r.map_err(FdPassError::Recv)?,
        }
    };
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(FdPassError::Recv)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in our table for this message; nothing
                // else owns it, so taking ownership here is the only reference.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
    {
        return Err(FdPassError::Truncated(buf_len));
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Err(FdPassError::Closed);
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use std::io::{Read, Seek, Write};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn passes_bytes_and_fds() {
        let (a, b) = pair();
        let mut f = std::fs::File::from(nix::unistd::dup(std::io::stdin().as_fd()).unwrap());
        // Use a real file whose contents prove it is the same open file on the other side.
        let mut tmp = tempfile();
        tmp.write_all(b"hello through SCM_RIGHTS").unwrap();
        send_with_fds(a.as_fd(), b"msg", &[tmp.as_fd(), f.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"msg");
        assert_eq!(fds.len(), 2);
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello through SCM_RIGHTS");
        f.flush().ok();
    }

    #[test]
    fn closed_peer_is_reported() {
        let (a, b) = pair();
        drop(a);
        let mut buf = [0u8; 4];
        assert!(matches!(
            recv_with_fds(b.as_fd(), &mut buf),
            Err(FdPassError::Closed)
        ));
    }

    #[test]
    fn truncation_is_an_error() {
        let (a, b) = pair();
        send_with_fds(a.as_fd(), &[7u8; 64], &[]).unwrap();
        let mut buf = [0u8; 8];
        assert!(matches!(
            recv_with_fds(b.as_fd(), &mut buf),
            Err(FdPassError::Truncated(8))
        ));
    }

    #[test]
    fn too_many_fds_refused() {
        let (a, _b) = pair();
        let fds: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
        assert!(matches!(
            send_with_fds(a.as_fd(), b"x", &fds),
            Err(FdPassError::TooManyFds(33))
        ));
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("ipc-fdpass-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
