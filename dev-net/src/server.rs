//! Serving connections on a listening socket: one `VhostUserDaemon` per frontend connection,
//! then back to `accept` on the same listener (a new core connection, or the core reconnecting
//! after a crash of either side).

#![forbid(unsafe_code)]

use std::sync::Arc;

use tracing::info;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use crate::GuestRam;
use crate::backend::NetBackend;
use crate::config::NetParams;
use crate::relay::Inner;
use crate::tap::Pair;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the vhost-user daemon: {0}")]
    Create(String),
    #[error("cannot accept a frontend connection: {0}")]
    Accept(String),
}

/// Accepts and serves frontends one after the other, forever. Each connection gets fresh
/// backend state (rings, memory table, worker threads); the pairs (tap queues, counters)
/// persist. Returns only on a listener error.
pub fn serve(
    listener: &mut Listener,
    inner: &Inner,
    params: &NetParams,
    pairs: &[Arc<Pair>],
) -> Result<(), ServeError> {
    let mut inner_listener = Listener::from(
        inner
            .listener()
            .try_clone()
            .map_err(|e| ServeError::Accept(e.to_string()))?,
    );
    for connection in 1u64.. {
        let mem = GuestMemoryAtomic::new(GuestRam::new());
        let backend = Arc::new(NetBackend::new(params.clone(), pairs, mem.clone()));
        let mut daemon = VhostUserDaemon::new("dev-net".to_owned(), Arc::clone(&backend), mem)
            .map_err(|e| ServeError::Create(e.to_string()))?;
        backend.connect(&daemon.get_epoll_handlers());
        // The frontend's connection goes through the relay (see `relay`), which connects to
        // the daemon's private socket before the daemon accepts there.
        let frontend = loop {
            match listener.accept() {
                Ok(Some(stream)) => break stream,
                Ok(None) => {}
                Err(e) => return Err(ServeError::Accept(e.to_string())),
            }
        };
        inner
            .relay(frontend)
            .map_err(|e| ServeError::Accept(e.to_string()))?;
        daemon
            .start(&mut inner_listener)
            .map_err(|e| ServeError::Accept(e.to_string()))?;
        info!(connection, "frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!(connection, "frontend disconnected"),
            Err(e) => info!(connection, "connection ended: {e}"),
        }
        // Dropping the daemon signals the workers' exit events and joins them, so no worker
        // of this connection touches a ring once the next connection starts.
        drop(daemon);
    }
    Ok(())
}
