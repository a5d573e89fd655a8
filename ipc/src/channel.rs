//! A typed message channel over a connected `SOCK_SEQPACKET` socket: each message is one
//! postcard-encoded value of a closed enum, with the file descriptors it introduces attached.
//!
//! `S` is what this side sends, `R` what it receives; the two ends of a socketpair use mirrored
//! types (see [`crate::control`]).

use crate::fdpass::{self, FdPassError};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use serde::{Serialize, de::DeserializeOwned};
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Largest encoded message (control messages are small; this bounds what a peer can make us
/// allocate).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Errors of a message channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot create socket pair")]
    Socketpair(#[source] nix::Error),
    #[error(transparent)]
    Transport(#[from] FdPassError),
    #[error("cannot encode message")]
    Encode(#[source] postcard::Error),
    #[error("malformed message of {len} bytes")]
    Decode {
        len: usize,
        #[source]
        source: postcard::Error,
    },
    #[error("encoded message of {0} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
}

/// One end of a typed seqpacket channel.
#[derive(Debug)]
pub struct Channel<S, R> {
    sock: OwnedFd,
    _types: PhantomData<fn(S) -> R>,
}

impl<S: Serialize, R: DeserializeOwned> Channel<S, R> {
    /// Wraps a connected `SOCK_SEQPACKET` socket (for example one inherited from the parent).
    pub fn from_fd(sock: OwnedFd) -> Self {
        Self {
            sock,
            _types: PhantomData,
        }
    }

    /// Creates a connected pair: `(this end, the peer's end as a raw socket)`.
    pub fn pair() -> Result<(Self, OwnedFd), ChannelError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(ChannelError::Socketpair)?;
        Ok((Self::from_fd(a), b))
    }

    /// Sends `msg` with `fds` attached.
    pub fn send(&self, msg: &S, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        let bytes = postcard::to_allocvec(msg).map_err(ChannelError::Encode)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ChannelError::TooLarge(bytes.len()));
        }
        fdpass::send_with_fds(self.sock.as_fd(), &bytes, fds)?;
        Ok(())
    }

    /// Blocks for the next message and the descriptors that came with it.
    pub fn recv(&self) -> Result<(R, Vec<OwnedFd>), ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let (len, fds) = fdpass::recv_with_fds(self.sock.as_fd(), &mut buf)?;
        let msg = postcard::from_bytes(&buf[..len])
            .map_err(|source| ChannelError::Decode { len, source })?;
        Ok((msg, fds))
    }
}

impl<S, R> AsFd for Channel<S, R> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Ping {
        Hello { n: u32, name: String },
        Bye,
    }

    #[test]
    fn round_trip_with_fd() {
        let (a, b_raw) = Channel::<Ping, Ping>::pair().unwrap();
        let b = Channel::<Ping, Ping>::from_fd(b_raw);
        let (r, w) = nix::unistd::pipe().unwrap();
        a.send(
            &Ping::Hello {
                n: 7,
                name: "core".into(),
            },
            &[w.as_fd()],
        )
        .unwrap();
        drop(w);
        let (msg, fds) = b.recv().unwrap();
        assert_eq!(
            msg,
            Ping::Hello {
                n: 7,
                name: "core".into()
            }
        );
        assert_eq!(fds.len(), 1);
        nix::unistd::write(&fds[0], b"z").unwrap();
        let mut got = [0u8; 1];
        nix::unistd::read(&r, &mut got).unwrap();
        assert_eq!(&got, b"z");
        b.send(&Ping::Bye, &[]).unwrap();
        assert_eq!(a.recv().unwrap().0, Ping::Bye);
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let (a, b_raw) = Channel::<Ping, Ping>::pair().unwrap();
        fdpass::send_with_fds(b_raw.as_fd(), &[0xff, 0xff, 0xff], &[]).unwrap();
        assert!(matches!(a.recv(), Err(ChannelError::Decode { len: 3, .. })));
    }

    #[test]
    fn peer_gone_is_closed() {
        let (a, b_raw) = Channel::<Ping, Ping>::pair().unwrap();
        drop(b_raw);
        assert!(matches!(
            a.recv(),
            Err(ChannelError::Transport(FdPassError::Closed))
        ));
    }
}
