//! A queue pair's process-lifetime state: its tap queue descriptor, its worker (receive
//! bounce buffer, counters) and its [`Gate`]. It outlives frontend connections, so a frontend
//! that reconnects finds the counters and the tap queue as they were.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use ipc::tap::TapError;
use tracing::{trace, warn};
use vm_memory::VolatileSlice;

use crate::gate::{Gate, TapControl};
use crate::worker::{PairWorker, Tap};

/// Adds the tap queue to (or removes it from) the epoll set of the worker thread serving the
/// pair, for the current connection.
pub trait Listener: Send {
    fn listen(&self, fd: RawFd, on: bool) -> io::Result<()>;
}

struct GateSlot {
    gate: Gate,
    listener: Option<Box<dyn Listener>>,
}

/// One queue pair and its tap queue.
pub struct Pair {
    index: u16,
    fd: OwnedFd,
    worker: Mutex<PairWorker>,
    gate: Mutex<GateSlot>,
}

impl Pair {
    /// Pair `index` over the tap queue `fd` (opened with `IFF_VNET_HDR`, non-blocking).
    /// `fixed`: never detach it (pair 0, or a single-queue tap).
    pub fn new(index: u16, fd: OwnedFd, fixed: bool) -> Self {
        Self {
            index,
            fd,
            worker: Mutex::new(PairWorker::new(index)),
            gate: Mutex::new(GateSlot {
                gate: Gate::new(fixed),
                listener: None,
            }),
        }
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The worker, for a batch (one thread at a time; a poisoned lock is taken over, the
    /// worker's state being valid between frames).
    pub fn worker(&self) -> MutexGuard<'_, PairWorker> {
        self.worker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tap queue as the worker reads and writes it.
    pub fn io(&self) -> TapIo<'_> {
        TapIo(self.fd.as_fd())
    }

    /// A new frontend connection, whose worker thread polls through `listener`.
    pub fn connect(&self, listener: Box<dyn Listener>) {
        self.with_gate(|gate, ctl| gate.connect(ctl), Some(listener));
    }

    /// The pair's receive ring was enabled or disabled.
    pub fn set_enabled(&self, enabled: bool) {
        self.with_gate(|gate, ctl| gate.set_enabled(enabled, ctl), None);
    }

    /// The worker ran out of receive buffers, or has some again.
    pub fn set_paused(&self, paused: bool) {
        self.with_gate(|gate, ctl| gate.set_paused(paused, ctl), None);
    }

    fn with_gate(
        &self,
        f: impl FnOnce(&mut Gate, &mut Control<'_>) -> Result<(), crate::gate::GateError>,
        listener: Option<Box<dyn Listener>>,
    ) {
        let mut slot = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut *slot;
        if let Some(l) = listener {
            slot.listener = Some(l);
        }
        let mut ctl = Control {
            fd: self.fd.as_fd(),
            listener: slot.listener.as_deref(),
        };
        if let Err(e) = f(&mut slot.gate, &mut ctl) {
            warn!(pair = self.index, "{e}: {}", source_of(&e));
        }
        trace!(
            pair = self.index,
            attached = ?slot.gate.attached(),
            listening = slot.gate.listening(),
            "gate"
        );
    }
}

fn source_of(e: &crate::gate::GateError) -> String {
    std::error::Error::source(e).map_or_else(String::new, ToString::to_string)
}

struct Control<'a> {
    fd: BorrowedFd<'a>,
    listener: Option<&'a dyn Listener>,
}

impl TapControl for Control<'_> {
    fn set_attached(&mut self, attached: bool) -> io::Result<()> {
        ipc::tap::set_queue_attached(self.fd, attached).map_err(|e| match e {
            TapError::Ioctl { source, .. } => source,
            other => io::Error::other(other),
        })
    }

    fn set_listening(&mut self, listening: bool) -> io::Result<()> {
        match self.listener {
            Some(l) => l.listen(self.fd.as_raw_fd(), listening),
            // No connection yet: nothing polls.
            None if listening => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no frontend connection",
            )),
            None => Ok(()),
        }
    }
}

/// A tap queue descriptor as a [`Tap`].
pub struct TapIo<'a>(pub BorrowedFd<'a>);

impl Tap for TapIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        nix::unistd::read(self.0, buf).map_err(io::Error::from)
    }

    fn write(&mut self, header: &[u8], frame: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
        ipc::tap::write_frame(self.0, header, frame)
    }
}
