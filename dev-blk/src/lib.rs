//! atoll's virtio-blk device: a vhost-user backend over raw image files.
//!
//! - [`config`]: feature bits and the `virtio_blk_config` space (pure).
//! - [`request`]: descriptor-chain walking, validation and execution against a [`request::Disk`]
//!   (pure, unit-tested with virtio-queue's mock rings).
//! - [`worker`]: one queue's in-order request loop (pure).
//! - [`disk`]: the raw image: `preadv`/`pwritev` into guest memory (through `ipc::guest_io`),
//!   `O_DIRECT`, `fallocate`.
//! - [`backend`]: the `vhost-user-backend` adapter (one worker thread per queue).
//! - [`server`]: the accept loop, one daemon per frontend connection.

#![forbid(unsafe_code)]

pub mod backend;
pub mod config;
pub mod disk;
pub mod request;
pub mod server;
pub mod worker;
