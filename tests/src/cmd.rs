//! Running external programs, always under coreutils' `timeout`.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::Duration;

/// Exit status `timeout` returns when the time ran out and the program ended on SIGTERM.
pub const TIMEOUT_STATUS: i32 = 124;
/// Exit status `timeout` returns when it had to send SIGKILL after the grace period.
pub const KILLED_STATUS: i32 = 137;
/// Grace period between SIGTERM and SIGKILL.
const KILL_AFTER_SECS: u64 = 10;

/// Errors of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    #[error("could not start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {} s", timeout.as_secs())]
    TimedOut { command: String, timeout: Duration },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

/// A program with its arguments, run under `timeout -k 10 <secs>`.
#[derive(Debug)]
pub struct TimedCommand {
    command: Command,
    display: String,
    limit: Duration,
}

impl TimedCommand {
    /// Prepares `program` to run for at most `limit`.
    pub fn new(program: impl AsRef<OsStr>, limit: Duration) -> Self {
        Self::with_timeout(program.as_ref(), limit, &[])
    }

    /// Like [`TimedCommand::new`] but with `timeout --foreground`, for programs that read the
    /// terminal: the program stays in the terminal's foreground process group.
    pub fn foreground(program: impl AsRef<OsStr>, limit: Duration) -> Self {
        Self::with_timeout(program.as_ref(), limit, &["--foreground"])
    }

    fn with_timeout(program: &OsStr, limit: Duration, options: &[&str]) -> Self {
        let mut command = Command::new("timeout");
        command
            .args(options)
            .arg("-k")
            .arg(KILL_AFTER_SECS.to_string())
            .arg(limit.as_secs().max(1).to_string())
            .arg(program);
        Self {
            command,
            display: program.to_string_lossy().into_owned(),
            limit,
        }
    }

    /// Appends one argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        let arg = arg.as_ref();
        let _ = write!(self.display, " {}", arg.to_string_lossy());
        self.command.arg(arg);
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for arg in args {
            self.arg(arg);
        }
        self
    }

    /// Sets the working directory.
    pub fn current_dir(&mut self, dir: &Path) -> &mut Self {
        self.command.current_dir(dir);
        self
    }

    /// Sets an environment variable.
    pub fn env(&mut self, key: &str, value: impl AsRef<OsStr>) -> &mut Self {
        self.command.env(key, value);
        self
    }

    /// The command line, for messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Runs with stdin from `/dev/null`, collecting stdout and stderr; a non-zero exit is
    /// an error.
    pub fn output_ok(&mut self) -> Result<Output, CmdError> {
        let output = self.output()?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(CmdError::Failed {
                command: self.display.clone(),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })
        }
    }

    /// Runs with stdin from `/dev/null`, collecting stdout and stderr, whatever the exit status
    /// (except a timeout, which is an error).
    pub fn output(&mut self) -> Result<Output, CmdError> {
        self.command.stdin(Stdio::null());
        let output = self.command.output().map_err(|source| CmdError::Spawn {
            command: self.display.clone(),
            source,
        })?;
        self.check_timeout(output.status)?;
        Ok(output)
    }

    /// Runs with inherited stdio and returns the exit status (a timeout is an error).
    pub fn status(&mut self) -> Result<ExitStatus, CmdError> {
        let status = self.command.status().map_err(|source| CmdError::Spawn {
            command: self.display.clone(),
            source,
        })?;
        self.check_timeout(status)?;
        Ok(status)
    }

    fn check_timeout(&self, status: ExitStatus) -> Result<(), CmdError> {
        match status.code() {
            Some(TIMEOUT_STATUS | KILLED_STATUS) => Err(CmdError::TimedOut {
                command: self.display.clone(),
                timeout: self.limit,
            }),
            _ => Ok(()),
        }
    }
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_when_needed() {
        assert_eq!(shell_quote("/a/b-c.d"), "/a/b-c.d");
        assert_eq!(
            shell_quote("console=ttyS0 panic=-1"),
            "'console=ttyS0 panic=-1'"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn reports_failure_with_stderr() {
        let err = TimedCommand::new("sh", Duration::from_secs(10))
            .args(["-c", "echo oops >&2; exit 3"])
            .output_ok()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("oops") && text.contains("sh -c"), "{text}");
    }

    #[test]
    fn reports_timeout() {
        let err = TimedCommand::new("sleep", Duration::from_secs(1))
            .arg("30")
            .output()
            .unwrap_err();
        assert!(matches!(err, CmdError::TimedOut { .. }), "{err}");
        assert!(err.to_string().contains("within 1 s"), "{err}");
    }
}
