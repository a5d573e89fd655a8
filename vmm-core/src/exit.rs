//! How the VM learns that it must end: a device (ACPI sleep register, reset port, pvpanic) or a
//! vCPU (triple fault) records the reason here; the first reason wins, and the event wakes the
//! main thread, which stops every vCPU.

use ipc::control::ExitReason;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// The VM-wide "this VM ends now, because ..." latch.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless another was recorded first, and wakes the waiter.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().expect("exit lock poisoned");
        if slot.is_none() {
            tracing::info!(?reason, "VM exit requested");
            *slot = Some(reason);
            // A full eventfd counter still wakes the reader, so the error can be ignored.
            let _ = self.event.write(1);
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.lock().expect("exit lock poisoned").clone()
    }

    /// Whether an exit was requested.
    pub fn is_set(&self) -> bool {
        self.reason.lock().expect("exit lock poisoned").is_some()
    }

    /// Readable once an exit was requested.
    #[cfg(test)]
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// The event's descriptor, for polling.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor belongs to `self.event`, which outlives the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.event.as_raw_fd()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.is_set());
        assert!(
            s.event().read().is_err(),
            "nothing to read before a request"
        );
        s.request(ExitReason::PowerOff);
        s.request(ExitReason::Reboot);
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
        assert_eq!(s.event().read().unwrap(), 1);
    }
}
