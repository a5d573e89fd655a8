//! Serving connections on a listening socket: one `VhostUserDaemon` per frontend connection,
//! then back to `accept` on the same listener (a new core connection, or the core reconnecting
//! after a crash of either side).

use std::sync::Arc;

use tracing::info;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use crate::backend::BlkBackend;
use crate::config::DiskGeometry;
use crate::disk::RawImage;
use crate::request::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the vhost-user daemon: {0}")]
    Create(String),
    #[error("cannot accept a frontend connection: {0}")]
    Accept(String),
}

/// Accepts and serves frontends one after the other, forever. Each connection gets fresh
/// backend state (rings, memory table, worker threads); the image and its geometry persist.
/// Returns only on a listener error.
pub fn serve(
    listener: &mut Listener,
    image: &Arc<RawImage>,
    geometry: &DiskGeometry,
) -> Result<(), ServeError> {
    for connection in 1u64.. {
        let mem = GuestMemoryAtomic::new(GuestRam::new());
        let backend = Arc::new(BlkBackend::new(geometry.clone(), image, mem.clone()));
        let mut daemon = VhostUserDaemon::new("dev-blk".to_owned(), backend, mem)
            .map_err(|e| ServeError::Create(e.to_string()))?;
        daemon
            .start(listener)
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
