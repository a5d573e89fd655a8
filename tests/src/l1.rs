//! The L1 guest: a Debian kernel under QEMU-TCG with an emulated SVM CPU, whose own KVM runs
//! the L2 guests. It sees the host's `/` (read-only, under a tmpfs overlay) and the work
//! directory (writable, at its host path), runs the work directory's `l1-script.sh` and powers
//! off. Runs that fail by themselves (TESTBED.md: about 1 in 40) are detected and retried once.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cmd::{CmdError, TimedCommand};
use crate::initramfs::{self, InitramfsError};
use crate::io_error::{IoError, io};
use crate::kernel::Kernel;

/// The script L1 runs, inside the work directory.
pub const SCRIPT: &str = "l1-script.sh";
/// L1's serial console, as QEMU saw it.
pub const CONSOLE_LOG: &str = "l1-console.log";
/// The script's output (batch mode).
pub const SCRIPT_LOG: &str = "l1-script.log";
/// Written by L1 once the script finished: `TESTBED_L1_RESULT rc=<status>`.
pub const RESULT: &str = "l1-result";

/// How to run L1.
#[derive(Clone, Debug)]
pub struct L1Options {
    /// QEMU `-cpu` model: `max` (SVM with nested paging) or e.g. `qemu64,+svm` (shadow paging).
    pub cpu: String,
    /// L1 RAM in MiB.
    pub memory_mib: u32,
    /// L1 vCPUs: at least as many as any L2 guest has (TESTBED.md).
    pub smp: u32,
    /// Upper bound for one L1 run, boot to power-off.
    pub timeout: Duration,
}

impl Default for L1Options {
    /// `-cpu max` (or `$ATOLL_TESTBED_L1_CPU`), 2 GiB, 2 vCPUs, 10 minutes.
    fn default() -> Self {
        Self {
            cpu: std::env::var("ATOLL_TESTBED_L1_CPU").unwrap_or_else(|_| "max".to_owned()),
            memory_mib: 2048,
            smp: 2,
            timeout: Duration::from_secs(600),
        }
    }
}

/// Errors of [`run`].
#[derive(Debug, thiserror::Error)]
pub enum L1Error {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(
        "the work directory {0} has whitespace in its path, which the L1 kernel command line cannot carry"
    )]
    WorkPath(PathBuf),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error(transparent)]
    Command(#[from] CmdError),
    #[error("L1 did not finish within {} s; console log: {console}", timeout.as_secs())]
    TimedOut { timeout: Duration, console: PathBuf },
    #[error("another L1 run held {path} for more than {} s", waited.as_secs())]
    Busy { waited: Duration, path: PathBuf },
    #[error("QEMU (L1) failed ({status}): {stderr}")]
    Qemu { status: String, stderr: String },
    #[error("the L1 guest could not set itself up: {line} (console log: {console})")]
    Setup { line: String, console: PathBuf },
    #[error(
        "the L1 guest failed twice by itself (last time: {reason}); console log: {console}; \
         such failures are TCG's, about 1 in 40 runs, so two in a row suggest an overloaded host"
    )]
    Flaky { reason: String, console: PathBuf },
}

/// The outcome of a script run in L1 (or directly on the host).
#[derive(Debug)]
pub struct ScriptRun {
    /// The script's exit status.
    pub status: i32,
    /// L1 boots it took (2 after a retry; 0 when run directly on the host).
    pub l1_boots: u32,
    /// L1's console log, or the script's output when run directly on the host.
    pub log: PathBuf,
}

/// Boots L1 to run `script` (a POSIX shell script run by the host's `/bin/sh`, with
/// `$TESTBED_WORK` set and the work directory as current directory). In batch mode the
/// script's output goes to `l1-script.log` and L1's console to `l1-console.log`; interactive
/// mode puts L1's console on this process's terminal (quit with Ctrl-A X).
pub fn run(
    kernel: &Kernel,
    work: &Path,
    script: &str,
    options: &L1Options,
    interactive: bool,
) -> Result<ScriptRun, L1Error> {
    let work = std::fs::canonicalize(work).map_err(io("resolving", work))?;
    let work_str = work.to_string_lossy().into_owned();
    if work_str.chars().any(char::is_whitespace) {
        return Err(L1Error::WorkPath(work));
    }
    let script_path = work.join(SCRIPT);
    std::fs::write(&script_path, script).map_err(io("writing", &script_path))?;
    let initrd = work.join("l1-initramfs.cpio");
    std::fs::write(&initrd, initramfs::l1_initramfs(kernel)?).map_err(io("writing", &initrd))?;
    let console = work.join(CONSOLE_LOG);
    let result = work.join(RESULT);

    // Interactive runs last as long as someone types; they neither wait nor make others wait.
    let _lock = if interactive {
        None
    } else {
        Some(machine_lock(options.timeout)?)
    };
    let attempts = if interactive { 1 } else { 2 };
    let mut reason = String::new();
    for attempt in 1..=attempts {
        if attempt > 1 && console.exists() {
            // Keep the failed attempt's console for diagnosis.
            let kept = work.join(format!("l1-console.attempt{}.log", attempt - 1));
            std::fs::rename(&console, &kept).map_err(io("renaming", &console))?;
        }
        for stale in [&console, &result] {
            if stale.exists() {
                std::fs::remove_file(stale).map_err(io("removing", stale))?;
            }
        }
        let mut qemu = l1_command(kernel, &work_str, &initrd, &console, options, interactive);
        let outcome = if interactive {
            qemu.status().map(|status| (status, String::new()))
        } else {
            let watchdog = StallWatchdog::start(
                &work_str,
                vec![console.clone(), work.join(SCRIPT_LOG)],
                STALL_LIMIT,
            );
            let outcome = qemu.output().map(|out| {
                let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                (out.status, stderr)
            });
            if watchdog.stop() {
                eprintln!(
                    "testbed: L1 attempt {attempt} wrote nothing for {} s and was stopped (TCG froze)",
                    STALL_LIMIT.as_secs()
                );
            }
            outcome
        };
        let log = std::fs::read(&console).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        if let Some(line) = log.lines().find(|l| l.contains("TESTBED_L1_FATAL")) {
            return Err(L1Error::Setup {
                line: line.trim().to_owned(),
                console,
            });
        }
        let soft_lockup = log.contains("soft lockup");
        reason = match outcome {
            Err(CmdError::TimedOut { .. }) if soft_lockup => {
                "a CPU soft lockup, then the time ran out".to_owned()
            }
            // Every L2 boot inside L1 has its own, shorter timeout, so an L1 that runs out of
            // time froze by itself (TCG's rare hang, TESTBED.md): that earns the one retry.
            Err(CmdError::TimedOut { timeout, .. }) if attempt == attempts => {
                return Err(L1Error::TimedOut { timeout, console });
            }
            Err(CmdError::TimedOut { timeout, .. }) => {
                format!("no result within {} s: L1 froze", timeout.as_secs())
            }
            Err(other) => return Err(other.into()),
            Ok((status, stderr)) if !status.success() && log.is_empty() => {
                // QEMU itself refused to start: retrying will not help.
                return Err(L1Error::Qemu {
                    status: status.to_string(),
                    stderr,
                });
            }
            Ok(_) if soft_lockup => "a CPU soft lockup on L1's console".to_owned(),
            Ok(_) => match std::fs::read_to_string(&result)
                .ok()
                .as_deref()
                .and_then(parse_result)
            {
                Some(status) => {
                    return Ok(ScriptRun {
                        status,
                        l1_boots: attempt,
                        log: console,
                    });
                }
                None => "L1 powered off without writing its result".to_owned(),
            },
        };
        eprintln!(
            "testbed: L1 attempt {attempt} failed by itself ({reason}); console: {}",
            console.display()
        );
    }
    Err(L1Error::Flaky { reason, console })
}

/// How long a batch L1 may go without writing to its console or its script log before it is
/// taken for frozen (TCG's rare hang, TESTBED.md) and stopped, which earns the retry at once
/// instead of at the end of the session's whole time limit. Every L2 boot in L1 prints a line
/// when it starts and when it ends, and none may last longer than 7 minutes (the longest
/// per-boot limit the tests use), so 8 minutes of silence is a freeze.
pub const STALL_LIMIT: Duration = Duration::from_secs(8 * 60);

/// Watches an L1's output files; stops the L1 (its QEMU, found by the unique work directory
/// on its command line) when they stop growing for [`STALL_LIMIT`].
struct StallWatchdog {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<bool>,
}

impl StallWatchdog {
    fn start(work: &str, files: Vec<PathBuf>, limit: Duration) -> Self {
        use std::sync::atomic::Ordering;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&done);
        let marker = format!("testbed.work={work} ");
        let thread = std::thread::spawn(move || {
            let size = || -> u64 {
                files
                    .iter()
                    .filter_map(|f| std::fs::metadata(f).ok())
                    .map(|m| m.len())
                    .sum()
            };
            let mut last = size();
            let mut since = std::time::Instant::now();
            while !flag.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(500));
                let now = size();
                if now != last {
                    last = now;
                    since = std::time::Instant::now();
                } else if since.elapsed() > limit {
                    let _ = std::process::Command::new("pkill")
                        .args(["-TERM", "-f", &marker])
                        .status();
                    return true;
                }
            }
            false
        });
        Self { done, thread }
    }

    /// Ends the watch; whether it had to stop the L1.
    fn stop(self) -> bool {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().unwrap_or(false)
    }
}

/// Takes the machine-wide L1 lock (`$TMPDIR/atoll-testbed-l1.lock`), waiting at most `wait`:
/// two TCG guests on a small host slow each other down several times, past their timeouts,
/// whichever workspace or developer started them.
fn machine_lock(wait: Duration) -> Result<File, L1Error> {
    lock_file(&std::env::temp_dir().join("atoll-testbed-l1.lock"), wait)
}

/// An exclusive `flock` on `path`, released when the returned file is dropped.
fn lock_file(path: &Path, wait: Duration) -> Result<File, L1Error> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .or_else(|_| File::open(path))
        .map_err(io("opening", path))?;
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                if !said {
                    eprintln!(
                        "testbed: waiting for another L1 run on this machine to finish ({})",
                        path.display()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(L1Error::Busy {
                    waited: wait,
                    path: path.to_path_buf(),
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(io("locking", path)(source).into());
            }
        }
    }
}

/// Parses `TESTBED_L1_RESULT rc=<n>`.
fn parse_result(text: &str) -> Option<i32> {
    text.trim()
        .strip_prefix("TESTBED_L1_RESULT rc=")
        .and_then(|rc| rc.parse().ok())
}

/// QEMU's option syntax doubles a comma inside a value.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn l1_command(
    kernel: &Kernel,
    work: &str,
    initrd: &Path,
    console: &Path,
    options: &L1Options,
    interactive: bool,
) -> TimedCommand {
    let mode = if interactive { "interactive" } else { "batch" };
    let mut qemu = if interactive {
        TimedCommand::foreground("qemu-system-x86_64", Duration::from_secs(24 * 3600))
    } else {
        TimedCommand::new("qemu-system-x86_64", options.timeout)
    };
    qemu.args(["-accel", "tcg,thread=multi", "-cpu", &options.cpu])
        .args(["-m", &options.memory_mib.to_string()])
        .args(["-smp", &options.smp.to_string()])
        .args([
            "-no-reboot",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet loglevel=4 testbed.work={work} testbed.mode={mode}"
        ))
        .arg("-virtfs")
        .arg(
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,\
             multidevs=remap,id=hostroot",
        )
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=work,security_model=none,multidevs=remap,id=work",
            qemu_escape(work)
        ));
    let log = qemu_escape(&console.to_string_lossy());
    if interactive {
        qemu.arg("-chardev")
            .arg(format!("stdio,id=con,mux=on,signal=off,logfile={log}"))
            .args([
                "-serial",
                "chardev:con",
                "-mon",
                "chardev=con,mode=readline",
            ]);
    } else {
        qemu.arg("-chardev")
            .arg(format!("file,id=con,path={log}"))
            .args(["-serial", "chardev:con", "-monitor", "none"]);
    }
    qemu
}

/// Runs `script` directly on the host (whose KVM is real), the same way L1 would: from the
/// work directory, with `$TESTBED_WORK` set, output to `l1-script.log`.
pub fn run_direct(work: &Path, script: &str, timeout: Duration) -> Result<ScriptRun, L1Error> {
    let work = std::fs::canonicalize(work).map_err(io("resolving", work))?;
    let script_path = work.join(SCRIPT);
    std::fs::write(&script_path, script).map_err(io("writing", &script_path))?;
    let log = work.join(SCRIPT_LOG);
    let out = TimedCommand::new("sh", timeout)
        .arg("-c")
        .arg(format!("sh {SCRIPT} > {SCRIPT_LOG} 2>&1"))
        .current_dir(&work)
        .env("TESTBED_WORK", &work)
        .env("TESTBED_LEVEL", "host")
        .output()?;
    Ok(ScriptRun {
        status: out.status.code().unwrap_or(-1),
        l1_boots: 0,
        log,
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_silent_l1_is_stopped_and_a_talking_one_is_not() {
        let dir = std::env::temp_dir().join(format!("atoll-l1-watchdog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let work = dir.to_string_lossy().into_owned();
        let log = dir.join("out.log");
        // A stand-in L1 whose command line carries the marker; it writes nothing.
        let mut silent = std::process::Command::new("sh")
            .args(["-c", &format!("sleep 60 # testbed.work={work} x")])
            .spawn()
            .unwrap();
        let dog = StallWatchdog::start(&work, vec![log.clone()], Duration::from_secs(2));
        let status = silent.wait().unwrap();
        assert!(dog.stop(), "the watchdog did not act");
        assert!(!status.success(), "{status}");
        // One that keeps writing is left alone.
        let dog = StallWatchdog::start(&work, vec![log.clone()], Duration::from_secs(2));
        for i in 0..8 {
            std::fs::write(&log, "x".repeat(i + 1)).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(!dog.stop());
        std::fs::remove_dir_all(&dir).unwrap();
    }
    use super::*;

    #[test]
    fn parses_the_result_marker() {
        assert_eq!(parse_result("TESTBED_L1_RESULT rc=0\n"), Some(0));
        assert_eq!(parse_result("TESTBED_L1_RESULT rc=3"), Some(3));
        assert_eq!(parse_result("TESTBED_L1_RESULT rc="), None);
        assert_eq!(parse_result(""), None);
    }

    #[test]
    fn one_l1_run_at_a_time() {
        let path = std::env::temp_dir().join(format!("atoll-l1-lock-test-{}", std::process::id()));
        let held = lock_file(&path, Duration::from_secs(1)).unwrap();
        let err = lock_file(&path, Duration::from_millis(600)).unwrap_err();
        assert!(matches!(err, L1Error::Busy { .. }), "{err}");
        drop(held);
        lock_file(&path, Duration::from_secs(1)).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn escapes_commas_for_qemu() {
        assert_eq!(qemu_escape("/a,b/c"), "/a,,b/c");
    }
}
