//! Shared vocabulary of atoll's processes.
//!
//! - [`addr`]: typed guest-physical, MMIO and port-I/O addresses.
//! - [`fdpass`]: sending bytes plus file descriptors over UNIX sockets (`SCM_RIGHTS`).
//! - [`channel`]: a typed, postcard-encoded message channel over a `SOCK_SEQPACKET` socket.
//! - [`control`]: the launcher <-> core control messages (one closed enum per direction).
//! - [`logging`]: the shared `tracing` setup (`ATOLL_LOG`, labelled lines, JSON on request).
//! - [`spawn`]: starting a child as a fresh `exec` with an explicit list of inherited fds.
//! - [`inherit`]: taking ownership of descriptors inherited across `exec`, each at most once.
//! - [`guest_io`]: positioned vectored I/O between a file and guest memory.
//! - [`sandbox`]: confinement of child processes (launcher side) and lockdown (process side).

pub mod addr;
pub mod channel;
pub mod control;
pub mod fdpass;
pub mod guest_io;
pub mod inherit;
pub mod logging;
pub mod sandbox;
pub mod spawn;
pub mod tap;
