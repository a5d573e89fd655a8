//! When a pair's tap queue is attached to the tap and polled by the pair's worker thread.
//!
//! - Attached while the pair's receive ring is enabled (`SET_VRING_ENABLE`): the host then
//!   steers frames only to queues the guest serves. The core disables the pairs the guest
//!   stops using (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`), and their tap queues are detached
//!   (`TUNSETQUEUE`), so no frame waits in a queue nobody reads. Pair 0, and the only queue of
//!   a single-queue tap, stay attached: the guest always has pair 0, and frames that arrive
//!   while no frontend is connected wait in it.
//! - Polled while the ring is enabled and the guest has receive buffers (not paused, see
//!   [`crate::worker::RxState::Paused`]).
//!
//! Polling stops before a queue is detached and starts after it is attached.

#![forbid(unsafe_code)]

use std::io;

/// The two switches of a tap queue.
pub trait TapControl {
    /// Attaches (`true`) or detaches the tap queue. `EINVAL` means it already was.
    fn set_attached(&mut self, attached: bool) -> io::Result<()>;
    /// Starts or stops polling the tap queue in the worker's epoll set. `EEXIST` (`ENOENT`)
    /// means it already was (was not) polled.
    fn set_listening(&mut self, listening: bool) -> io::Result<()>;
}

/// Why a switch failed; the state stays what it was, and the next change retries.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot {} the tap queue", if *.attach { "attach" } else { "detach" })]
    Attach {
        attach: bool,
        #[source]
        source: io::Error,
    },
    #[error("cannot {} polling the tap queue", if *.listen { "start" } else { "stop" })]
    Listen {
        listen: bool,
        #[source]
        source: io::Error,
    },
}

/// The wanted and the applied state of one tap queue.
#[derive(Debug)]
pub struct Gate {
    /// Never detached (pair 0, or a single-queue tap).
    fixed: bool,
    /// `None` until known (a queue inherited from an earlier process may be either).
    attached: Option<bool>,
    listening: bool,
    enabled: bool,
    paused: bool,
}

impl Gate {
    pub fn new(fixed: bool) -> Self {
        Self {
            fixed,
            attached: fixed.then_some(true),
            listening: false,
            enabled: false,
            paused: false,
        }
    }

    /// A new frontend connection: its epoll set is new (nothing polled), its rings are not
    /// enabled yet.
    pub fn connect(&mut self, ctl: &mut impl TapControl) -> Result<(), GateError> {
        self.listening = false;
        self.enabled = false;
        self.paused = false;
        self.apply(ctl)
    }

    /// The receive ring was enabled or disabled.
    pub fn set_enabled(
        &mut self,
        enabled: bool,
        ctl: &mut impl TapControl,
    ) -> Result<(), GateError> {
        self.enabled = enabled;
        self.apply(ctl)
    }

    /// The worker ran out of receive buffers (`true`) or has some again.
    pub fn set_paused(&mut self, paused: bool, ctl: &mut impl TapControl) -> Result<(), GateError> {
        self.paused = paused;
        self.apply(ctl)
    }

    pub fn attached(&self) -> Option<bool> {
        self.attached
    }

    pub fn listening(&self) -> bool {
        self.listening
    }

    fn apply(&mut self, ctl: &mut impl TapControl) -> Result<(), GateError> {
        let attach = self.fixed || self.enabled;
        let listen = self.enabled && !self.paused;
        if self.listening && !listen {
            match ctl.set_listening(false) {
                Ok(()) => self.listening = false,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => self.listening = false,
                Err(source) => {
                    return Err(GateError::Listen {
                        listen: false,
                        source,
                    });
                }
            }
        }
        if self.attached != Some(attach) {
            match ctl.set_attached(attach) {
                Ok(()) => self.attached = Some(attach),
                // Already in that state (a queue inherited from an earlier process).
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    self.attached = Some(attach)
                }
                Err(source) => {
                    self.attached = None;
                    return Err(GateError::Attach { attach, source });
                }
            }
        }
        if !self.listening && listen {
            match ctl.set_listening(true) {
                Ok(()) => self.listening = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => self.listening = true,
                Err(source) => {
                    return Err(GateError::Listen {
                        listen: true,
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every switch; `fail` makes the next matching call fail with that errno.
    #[derive(Default)]
    struct Log {
        calls: Vec<String>,
        fail_attach: Option<i32>,
        fail_listen: Option<i32>,
    }

    impl TapControl for Log {
        fn set_attached(&mut self, attached: bool) -> io::Result<()> {
            self.calls.push(format!("attach={attached}"));
            match self.fail_attach.take() {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => Ok(()),
            }
        }

        fn set_listening(&mut self, listening: bool) -> io::Result<()> {
            self.calls.push(format!("listen={listening}"));
            match self.fail_listen.take() {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => Ok(()),
            }
        }
    }

    #[test]
    fn a_second_pair_follows_its_ring() {
        let mut log = Log::default();
        let mut g = Gate::new(false);
        assert_eq!(g.attached(), None);
        g.connect(&mut log).unwrap();
        assert_eq!(log.calls, ["attach=false"]);
        g.set_enabled(true, &mut log).unwrap();
        g.set_paused(true, &mut log).unwrap();
        g.set_paused(false, &mut log).unwrap();
        g.set_enabled(false, &mut log).unwrap();
        assert_eq!(
            log.calls,
            [
                "attach=false",
                "attach=true",
                "listen=true",
                "listen=false",
                "listen=true",
                "listen=false",
                "attach=false"
            ]
        );
        assert_eq!((g.attached(), g.listening()), (Some(false), false));
    }

    #[test]
    fn pair_zero_is_never_detached() {
        let mut log = Log::default();
        let mut g = Gate::new(true);
        g.connect(&mut log).unwrap();
        g.set_enabled(true, &mut log).unwrap();
        g.set_enabled(false, &mut log).unwrap();
        assert_eq!(log.calls, ["listen=true", "listen=false"]);
        assert_eq!(g.attached(), Some(true));
    }

    #[test]
    fn a_new_connection_forgets_the_old_epoll_set() {
        let mut log = Log::default();
        let mut g = Gate::new(true);
        g.set_enabled(true, &mut log).unwrap();
        assert!(g.listening());
        g.connect(&mut log).unwrap();
        assert!(!g.listening());
        assert_eq!(
            log.calls,
            ["listen=true"],
            "nothing to remove from a dead epoll set"
        );
    }

    #[test]
    fn already_in_state_is_success_and_errors_are_retried() {
        let mut log = Log {
            fail_attach: Some(nix::libc::EINVAL),
            ..Log::default()
        };
        let mut g = Gate::new(false);
        g.connect(&mut log).unwrap();
        assert_eq!(g.attached(), Some(false), "EINVAL: it was detached already");

        log.fail_attach = Some(nix::libc::EPERM);
        let err = g.set_enabled(true, &mut log).unwrap_err();
        assert!(
            matches!(err, GateError::Attach { attach: true, .. }),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "cannot attach the tap queue");
        assert_eq!(g.attached(), None);
        assert!(!g.listening(), "not polled while the attach failed");
        g.set_paused(false, &mut log).unwrap();
        assert_eq!((g.attached(), g.listening()), (Some(true), true));

        log.fail_listen = Some(nix::libc::EEXIST);
        g.set_paused(true, &mut log).unwrap_err();
        assert!(g.listening(), "stop failed: still polled");
        log.fail_listen = Some(nix::libc::ENOENT);
        g.set_paused(true, &mut log).unwrap();
        assert!(!g.listening());
        log.fail_listen = Some(nix::libc::EEXIST);
        g.set_paused(false, &mut log).unwrap();
        assert!(g.listening(), "EEXIST: already polled");
    }
}
