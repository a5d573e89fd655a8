//! atoll's virtio-net device: a vhost-user backend whose queue pairs each run on one queue of
//! a tap interface.
//!
//! Pure logic (no sockets, no syscalls, unit-tested with virtio-queue's mock rings):
//! - [`config`]: offered features, the `virtio_net_config` space, MAC addresses, and which
//!   `TUN_F_*` offloads follow from the guest's features.
//! - [`header`]: the virtio-net header (`virtio_net_hdr_v1`) and its validation.
//! - [`chain`]: walking and validating descriptor chains into guest-memory segments.
//! - [`rx`]: placing one received frame into the guest's receive buffers (mergeable or not).
//! - [`stats`]: per-queue counters and the kinds of dropped frames.
//! - [`worker`]: one queue pair's receive and transmit loops, in order, with EVENT_IDX.
//! - [`gate`]: when a pair's tap queue is attached and polled.
//!
//! Adapters:
//! - [`tap`]: the tap queue descriptor behind a pair (reads, gathered writes, ioctls through
//!   `ipc::tap`).
//! - [`backend`]: the `vhost-user-backend` adapter (one worker thread per queue pair).
//! - [`server`]: the accept loop, one daemon per frontend connection.

#![forbid(unsafe_code)]

pub mod backend;
pub mod chain;
pub mod config;
pub mod gate;
pub mod header;
pub mod relay;
pub mod rx;
pub mod server;
pub mod stats;
pub mod tap;
pub mod worker;

#[cfg(test)]
mod test_ring;

/// Guest memory as the backend maps it (no dirty-page bitmap).
pub type GuestRam = vm_memory::GuestMemoryMmap<()>;
