//! Taking ownership of descriptors inherited across `exec` (placed by the parent with
//! [`crate::spawn`] and named on the command line or by a fixed number).
//!
//! Turning a descriptor number into an [`OwnedFd`] is sound only if nothing else in the
//! process owns that number. [`take_inherited_fd`] establishes that without an `unsafe`
//! contract at its callers:
//! - it hands out only numbers that were open when the process started: a hook in
//!   `.init_array` records them before `main` (and so before the process opened anything), so
//!   a descriptor the process opened itself is never mistaken for an inherited one;
//! - it hands each number out at most once per process;
//! - it refuses 0..=2, which belong to stdio.
//!
//! The descriptor it returns has `FD_CLOEXEC` set, so it does not leak into later children.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// The highest descriptor number recorded at startup (and so the highest one that can be
/// taken).
pub const MAX_INHERITED_FD: RawFd = 1023;

/// Bitset words covering `0..=MAX_INHERITED_FD`.
const WORDS: usize = 16;
const _: () = assert!(WORDS * 64 == MAX_INHERITED_FD as usize + 1);

/// Descriptors open when the process started.
static OPEN_AT_START: [AtomicU64; WORDS] = [const { AtomicU64::new(0) }; WORDS];
/// Descriptors already handed out by [`take_inherited_fd`].
static TAKEN: [AtomicU64; WORDS] = [const { AtomicU64::new(0) }; WORDS];

const SNAPSHOT_NOT_RUN: u8 = 0;
const SNAPSHOT_OK: u8 = 1;
const SNAPSHOT_FAILED: u8 = 2;
/// Outcome of the startup scan (one of the `SNAPSHOT_*` values).
static SNAPSHOT: AtomicU8 = AtomicU8::new(SNAPSHOT_NOT_RUN);
/// The errno of a failed startup scan.
static SNAPSHOT_ERRNO: AtomicI32 = AtomicI32::new(0);

/// Runs before `main` (the dynamic loader, or the static startup code, calls every function in
/// `.init_array`), when the only descriptors of the process are the ones it inherited.
#[used]
// SAFETY: `.init_array` holds pointers to functions taking `(argc, argv, envp)` and returning
// nothing; this entry has exactly that type, and `record_open_fds` is safe to run before
// `main` (it only calls `getrlimit` and `poll` and stores into atomics).
#[unsafe(link_section = ".init_array")]
static STARTUP_HOOK: extern "C" fn(
    libc::c_int,
    *const *const libc::c_char,
    *const *const libc::c_char,
) = record_open_fds;

extern "C" fn record_open_fds(
    _argc: libc::c_int,
    _argv: *const *const libc::c_char,
    _envp: *const *const libc::c_char,
) {
    match scan_open_fds() {
        Ok(()) => SNAPSHOT.store(SNAPSHOT_OK, Ordering::Release),
        Err(e) => {
            SNAPSHOT_ERRNO.store(e as i32, Ordering::Relaxed);
            SNAPSHOT.store(SNAPSHOT_FAILED, Ordering::Release);
        }
    }
}

/// Records which of `3..=MAX_INHERITED_FD` are open, with `poll` (an unused number reports
/// `POLLNVAL`), in as few calls as `RLIMIT_NOFILE` allows (`poll` refuses more entries).
fn scan_open_fds() -> Result<(), Errno> {
    const SCAN: usize = MAX_INHERITED_FD as usize - 2;
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    let chunk = usize::try_from(soft).unwrap_or(SCAN).clamp(1, SCAN);
    let mut pfds = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; SCAN];
    let mut first: RawFd = 3;
    while first <= MAX_INHERITED_FD {
        let left = usize::try_from(MAX_INHERITED_FD - first + 1).unwrap_or(0);
        let n = chunk.min(left);
        let batch = &mut pfds[..n];
        for (p, fd) in batch.iter_mut().zip(first..) {
            *p = libc::pollfd {
                fd,
                events: 0,
                revents: 0,
            };
        }
        let nfds = libc::nfds_t::try_from(n).map_err(|_| Errno::EINVAL)?;
        loop {
            // SAFETY: `batch` is a valid array of `n` pollfds; poll only writes their
            // `revents`. A zero timeout makes it a pure query.
            let ret = unsafe { libc::poll(batch.as_mut_ptr(), nfds, 0) };
            if ret >= 0 {
                break;
            }
            match Errno::last() {
                Errno::EINTR => {}
                e => return Err(e),
            }
        }
        for p in batch.iter() {
            if p.revents & libc::POLLNVAL == 0
                && let Some((word, bit)) = slot(p.fd)
            {
                OPEN_AT_START[word].fetch_or(bit, Ordering::Relaxed);
            }
        }
        first += RawFd::try_from(n).map_err(|_| Errno::EINVAL)?;
    }
    Ok(())
}

/// The bitset word and bit of `fd`, if it is in `0..=MAX_INHERITED_FD`.
fn slot(fd: RawFd) -> Option<(usize, u64)> {
    let i = usize::try_from(fd).ok()?;
    (fd <= MAX_INHERITED_FD).then(|| (i / 64, 1u64 << (i % 64)))
}

/// Why an inherited descriptor cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum InheritError {
    #[error("fd {0} is stdio (0..=2), not an inherited descriptor")]
    Stdio(RawFd),
    #[error("fd {0} is outside the inherited range 3..={MAX_INHERITED_FD}")]
    OutOfRange(RawFd),
    #[error("fd {0} is not open (EBADF): the parent did not pass it")]
    NotOpen(RawFd),
    #[error("fd {0} was already taken in this process")]
    AlreadyTaken(RawFd),
    #[error("fd {0} was not open when the process started: it was not inherited")]
    NotInherited(RawFd),
    #[error("cannot query fd {fd}: {source}")]
    Query { fd: RawFd, source: Errno },
    #[error("the descriptors open at startup were not recorded: {0}")]
    NoSnapshot(Errno),
    #[error("cannot set FD_CLOEXEC on fd {fd}: {source}")]
    Cloexec { fd: RawFd, source: Errno },
}

/// Takes ownership of descriptor `fd`, inherited from the parent process.
///
/// Refuses 0..=2, numbers that are not open, numbers that were not open when the process
/// started, and numbers already taken; sets `FD_CLOEXEC` on the descriptor it returns.
pub fn take_inherited_fd(fd: RawFd) -> Result<OwnedFd, InheritError> {
    // Keeps the startup hook linked into every binary that calls this function.
    std::hint::black_box(&STARTUP_HOOK);
    if (0..=2).contains(&fd) {
        return Err(InheritError::Stdio(fd));
    }
    let Some((word, bit)) = slot(fd) else {
        return Err(InheritError::OutOfRange(fd));
    };
    if TAKEN[word].load(Ordering::Acquire) & bit != 0 {
        return Err(InheritError::AlreadyTaken(fd));
    }
    // SAFETY: F_GETFD only reads the descriptor table entry; an unused number yields EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(match Errno::last() {
            Errno::EBADF => InheritError::NotOpen(fd),
            source => InheritError::Query { fd, source },
        });
    }
    match SNAPSHOT.load(Ordering::Acquire) {
        SNAPSHOT_OK => {}
        SNAPSHOT_FAILED => {
            let errno = Errno::from_raw(SNAPSHOT_ERRNO.load(Ordering::Relaxed));
            return Err(InheritError::NoSnapshot(errno));
        }
        _ => return Err(InheritError::NoSnapshot(Errno::ENOSYS)),
    }
    if OPEN_AT_START[word].load(Ordering::Relaxed) & bit == 0 {
        return Err(InheritError::NotInherited(fd));
    }
    if TAKEN[word].fetch_or(bit, Ordering::AcqRel) & bit != 0 {
        return Err(InheritError::AlreadyTaken(fd));
    }
    // SAFETY: `fd` is open, was open when the process started (so the process did not open
    // it itself), is not stdio, and this is the only time this function returns it (the bit
    // in `TAKEN` was clear and is now set). Inherited descriptors have no other owner: code
    // that wraps them by number instead of through this function breaks this module's rule.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    fcntl(&owned, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|source| InheritError::Cloexec { fd, source })?;
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spawn::{Inherit, spawn_with_fds};
    use std::io::Read;
    use std::os::fd::{AsFd, AsRawFd};
    use std::process::Command;

    /// Set in the environment of the child started by `child_takes_inherited_fds_once`.
    const CHILD_ENV: &str = "IPC_INHERIT_TEST_CHILD";
    /// Where the child finds its inherited descriptors.
    const CHILD_REPORT_FD: RawFd = 9;
    const CHILD_EXTRA_FD: RawFd = 12;

    #[test]
    fn startup_scan_ran() {
        assert_eq!(SNAPSHOT.load(Ordering::Acquire), SNAPSHOT_OK);
        // stdio is open but never recorded: the scan starts at 3.
        assert_eq!(OPEN_AT_START[0].load(Ordering::Relaxed) & 0b111, 0);
    }

    #[test]
    fn refuses_stdio_and_out_of_range_numbers() {
        for fd in 0..=2 {
            assert!(matches!(take_inherited_fd(fd), Err(InheritError::Stdio(f)) if f == fd));
        }
        for fd in [-1, MAX_INHERITED_FD + 1, RawFd::MAX] {
            assert!(matches!(take_inherited_fd(fd), Err(InheritError::OutOfRange(f)) if f == fd));
        }
    }

    #[test]
    fn closed_number_is_not_open() {
        let err = take_inherited_fd(MAX_INHERITED_FD).unwrap_err();
        assert!(
            matches!(err, InheritError::NotOpen(MAX_INHERITED_FD)),
            "{err}"
        );
        assert!(err.to_string().contains("fd 1023 is not open"), "{err}");
    }

    #[test]
    fn descriptors_opened_by_the_process_are_refused() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let fd = w.as_raw_fd();
        assert!(matches!(take_inherited_fd(fd), Err(InheritError::NotInherited(f)) if f == fd));
        // Still owned by `w` and open.
        nix::unistd::write(&w, b"x").unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(&r, &mut buf).unwrap(), 1);
    }

    /// Runs in a child process with descriptors at `CHILD_REPORT_FD` and `CHILD_EXTRA_FD`;
    /// does nothing in a normal test run.
    #[test]
    #[ignore = "started as a child process by child_takes_inherited_fds_once"]
    fn child_side() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let report = take_inherited_fd(CHILD_REPORT_FD).expect("take the report pipe");
        let mut lines = Vec::new();
        let flags = fcntl(&report, FcntlArg::F_GETFD).unwrap();
        lines.push(format!(
            "cloexec={}",
            FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC)
        ));
        lines.push(format!(
            "again={:?}",
            take_inherited_fd(CHILD_REPORT_FD).err()
        ));
        let extra = take_inherited_fd(CHILD_EXTRA_FD).expect("take the extra descriptor");
        drop(extra);
        // The number is free again; a descriptor opened now may reuse it, yet it is refused.
        let reopened = std::fs::File::open("/dev/null").unwrap();
        // Left open (as a bare number) for the rest of the child's short life.
        let dup = fcntl(&reopened, FcntlArg::F_DUPFD_CLOEXEC(CHILD_EXTRA_FD)).unwrap();
        lines.push(format!(
            "reused={} retake={:?}",
            dup == CHILD_EXTRA_FD,
            take_inherited_fd(CHILD_EXTRA_FD).err()
        ));
        lines.push(format!(
            "unused={:?}",
            take_inherited_fd(CHILD_EXTRA_FD + 1).err()
        ));
        let text = lines.join("\n");
        nix::unistd::write(&report, text.as_bytes()).unwrap();
    }

    #[test]
    fn child_takes_inherited_fds_once() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let extra = std::fs::File::open("/dev/null").unwrap();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "inherit::tests::child_side",
            "--ignored",
            "--test-threads=1",
            "--quiet",
        ])
        .env(CHILD_ENV, "1")
        .stdout(std::process::Stdio::null());
        let mut child = spawn_with_fds(
            &mut cmd,
            &[
                Inherit {
                    fd: w.as_fd(),
                    target: CHILD_REPORT_FD,
                },
                Inherit {
                    fd: extra.as_fd(),
                    target: CHILD_EXTRA_FD,
                },
            ],
        )
        .unwrap();
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r).read_to_string(&mut out).unwrap();
        assert!(child.wait().unwrap().success(), "child failed: {out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "cloexec=true",
                "again=Some(AlreadyTaken(9))",
                "reused=true retake=Some(AlreadyTaken(12))",
                "unused=Some(NotOpen(13))",
            ],
            "{out}"
        );
    }
}
