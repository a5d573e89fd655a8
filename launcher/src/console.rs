//! The guest's serial console on the user's terminal.
//!
//! The core gets one end of a stream socket pair; two threads here copy stdin to the socket and
//! the socket to stdout. When stdin is a terminal it is put in raw mode for the VM's lifetime
//! and restored when the [`RawTerminal`] guard drops, and the QEMU-style escape Ctrl-A x
//! stops the VM.

#![forbid(unsafe_code)]

use nix::sys::termios::{self, SetArg, Termios};
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The escape key: Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// Errors of the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot read the terminal settings of stdin")]
    GetAttr(#[source] nix::Error),
    #[error("cannot put the terminal in raw mode")]
    SetAttr(#[source] nix::Error),
    #[error("cannot duplicate the console socket")]
    Clone(#[source] io::Error),
    #[error("cannot start a console thread")]
    Thread(#[source] io::Error),
}

/// Stdin in raw mode; the saved settings are restored on drop.
#[derive(Debug)]
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal; `None` if it is not one.
    pub fn enter() -> Result<Option<Self>, ConsoleError> {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(&stdin).map_err(ConsoleError::GetAttr)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        // Keep output post-processing so that lines printed by atoll itself (logs, the exit
        // summary) still start at the left margin.
        raw.output_flags = saved.output_flags;
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).map_err(ConsoleError::SetAttr)?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Err(e) = termios::tcsetattr(io::stdin(), SetArg::TCSANOW, &self.saved) {
            tracing::warn!("cannot restore the terminal settings: {e}");
        }
    }
}

/// What an escape sequence asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EscapeCommand {
    /// Ctrl-A x: stop the VM.
    Quit,
    /// Ctrl-A h: show the escape keys.
    Help,
}

/// The help text for Ctrl-A h.
pub const ESCAPE_HELP: &str = "\r\natoll console: Ctrl-A x  stop the VM;  Ctrl-A Ctrl-A  send Ctrl-A;  Ctrl-A h  this help\r\n";

/// Splits the escape sequences out of the input stream.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    after_escape: bool,
}

impl EscapeFilter {
    /// Appends to `out` the bytes of `input` that go to the guest and returns the commands it
    /// contained, in order. An escape split across two calls is recognised.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> Vec<EscapeCommand> {
        let mut commands = Vec::new();
        for &b in input {
            if self.after_escape {
                self.after_escape = false;
                match b {
                    b'x' | b'X' => commands.push(EscapeCommand::Quit),
                    b'h' | b'H' | b'?' => commands.push(EscapeCommand::Help),
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.after_escape = true;
            } else {
                out.push(b);
            }
        }
        commands
    }
}

/// The two copying threads.
#[derive(Debug)]
pub struct ConsolePumps {
    output: JoinHandle<()>,
}

impl ConsolePumps {
    /// Starts copying `input` (stdin) to `sock` and `sock` to stdout. With `escapes`, Ctrl-A
    /// sequences are interpreted and `on_quit` runs for Ctrl-A x. When `input` ends, input
    /// stops and the VM keeps running.
    pub fn start(
        input: impl Read + Send + 'static,
        sock: UnixStream,
        escapes: bool,
        on_quit: impl Fn() + Send + 'static,
    ) -> Result<Self, ConsoleError> {
        let input_sock = sock.try_clone().map_err(ConsoleError::Clone)?;
        thread::Builder::new()
            .name("console-in".into())
            .spawn(move || pump_input(input, input_sock, escapes, on_quit))
            .map_err(ConsoleError::Thread)?;
        let output = thread::Builder::new()
            .name("console-out".into())
            .spawn(move || pump_output(sock))
            .map_err(ConsoleError::Thread)?;
        Ok(Self { output })
    }

    /// Waits up to `timeout` for the guest's last output to reach stdout (the output thread
    /// ends when the core's end of the socket closes). Returns whether it finished.
    pub fn drain(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.output.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.output.join().is_ok()
    }
}

fn pump_input(mut input: impl Read, mut sock: UnixStream, escapes: bool, on_quit: impl Fn()) {
    let mut buf = [0u8; 4096];
    let mut filter = EscapeFilter::default();
    let mut out = Vec::with_capacity(buf.len());
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => {
                tracing::debug!("stdin closed; the console gets no more input");
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("cannot read stdin, console input stops: {e}");
                return;
            }
        };
        let data = if escapes {
            out.clear();
            for command in filter.filter(&buf[..n], &mut out) {
                match command {
                    EscapeCommand::Quit => on_quit(),
                    EscapeCommand::Help => {
                        let _ = io::stderr().write_all(ESCAPE_HELP.as_bytes());
                    }
                }
            }
            &out[..]
        } else {
            &buf[..n]
        };
        if let Err(e) = sock.write_all(data) {
            tracing::debug!("console socket closed for input: {e}");
            return;
        }
    }
}

fn pump_output(mut sock: UnixStream) {
    let mut buf = [0u8; 4096];
    let mut stdout_ok = true;
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("console socket read failed: {e}");
                return;
            }
        };
        if stdout_ok {
            let mut stdout = io::stdout().lock();
            if let Err(e) = stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()) {
                // Keep draining the socket so that the guest never blocks on its console.
                tracing::warn!("cannot write the console to stdout, discarding it from now: {e}");
                stdout_ok = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_pass() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(f.filter(b"ls -l\r", &mut out).is_empty());
        assert_eq!(out, b"ls -l\r");
    }

    #[test]
    fn ctrl_a_x_quits_and_is_not_sent() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert_eq!(f.filter(b"ab\x01xcd", &mut out), [EscapeCommand::Quit]);
        assert_eq!(out, b"abcd");
    }

    #[test]
    fn escape_split_across_reads() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(f.filter(b"a\x01", &mut out).is_empty());
        assert_eq!(f.filter(b"X", &mut out), [EscapeCommand::Quit]);
        assert_eq!(out, b"a");
    }

    #[test]
    fn double_escape_sends_one_and_others_pass_through() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(f.filter(b"\x01\x01\x01c", &mut out).is_empty());
        assert_eq!(out, b"\x01\x01c");
        out.clear();
        assert_eq!(f.filter(b"\x01h", &mut out), [EscapeCommand::Help]);
        assert!(out.is_empty());
    }

    #[test]
    fn input_reaches_the_socket_with_escapes_applied() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (quit_tx, quit_rx) = std::sync::mpsc::channel();
        let input: &'static [u8] = b"echo hi\r\x01\x01\x01x";
        let pumps = ConsolePumps::start(input, ours, true, move || {
            quit_tx.send(()).unwrap();
        })
        .unwrap();
        quit_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let mut got = [0u8; 9];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"echo hi\r\x01");
        // The core's end closing ends the output pump.
        drop(theirs);
        assert!(pumps.drain(Duration::from_secs(10)));
    }

    #[test]
    fn input_without_escapes_is_copied_verbatim() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let input: &'static [u8] = b"a\x01xb";
        let _pumps = ConsolePumps::start(input, ours, false, || panic!("no escapes")).unwrap();
        let mut got = [0u8; 4];
        theirs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"a\x01xb");
    }
}
