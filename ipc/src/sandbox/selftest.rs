//! Escape attempts for the confinement tests (feature `confinement-selftest` only: a
//! production build holds none of this code).
//!
//! Right after [`lockdown`](super::lockdown::lockdown()), a binary run with `ATOLL_SELFTEST`
//! set to one of `open`, `socket`, `exec`, `ptrace` tries that escape:
//! - `open`: `open("/etc/passwd", O_RDONLY)`;
//! - `socket`: `socket(AF_INET, SOCK_STREAM, 0)`;
//! - `exec`: `execve("/bin/true")`;
//! - `ptrace`: `ptrace(PTRACE_ATTACH, <parent pid, or 1 when the parent is outside the pid
//!   namespace>)`.
//!
//! It prints one line to stderr, `selftest <what>: failed: <ERRNO>` or
//! `selftest <what>: SUCCEEDED`, and exits with [`EXIT_BLOCKED`] or [`EXIT_ESCAPED`]. Under
//! seccomp in kill mode the process dies of `SIGSYS` before printing anything.

use nix::errno::Errno;
use std::ffi::CStr;

/// The variable naming the attempt.
pub const SELFTEST_ENV: &str = "ATOLL_SELFTEST";
/// Exit status when the attempt failed with an error (the sandbox held).
pub const EXIT_BLOCKED: i32 = 86;
/// Exit status when the attempt succeeded (the sandbox leaked).
pub const EXIT_ESCAPED: i32 = 87;
/// Exit status for an unknown `ATOLL_SELFTEST` value.
pub const EXIT_UNKNOWN: i32 = 88;

/// Runs the attempt `ATOLL_SELFTEST` names and exits; returns if the variable is unset.
/// `parent` is the parent's pid as this process saw it before lockdown (0 when the parent is
/// outside its pid namespace).
pub fn run_if_requested(parent: libc::pid_t) {
    let Some(what) = std::env::var_os(SELFTEST_ENV) else {
        return;
    };
    let what = what.to_string_lossy().into_owned();
    let result = match what.as_str() {
        "open" => attempt_open(),
        "socket" => attempt_socket(),
        "exec" => attempt_exec(),
        "ptrace" => attempt_ptrace(parent),
        other => {
            eprintln!("selftest {other}: unknown attempt (open, socket, exec, ptrace)");
            std::process::exit(EXIT_UNKNOWN);
        }
    };
    match result {
        Ok(()) => {
            eprintln!("selftest {what}: SUCCEEDED");
            std::process::exit(EXIT_ESCAPED);
        }
        Err(e) => {
            eprintln!("selftest {what}: failed: {e:?}");
            std::process::exit(EXIT_BLOCKED);
        }
    }
}

fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

fn attempt_open() -> Result<(), Errno> {
    const PATH: &CStr = c"/etc/passwd";
    // SAFETY: openat with a valid NUL-terminated path; the descriptor is closed below.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            PATH.as_ptr(),
            libc::O_RDONLY,
        )
    })?;
    // SAFETY: closing the descriptor just opened.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    Ok(())
}

fn attempt_socket() -> Result<(), Errno> {
    // SAFETY: socket takes integers only; the descriptor is closed below.
    let fd =
        check(unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) })?;
    // SAFETY: closing the descriptor just opened.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    Ok(())
}

fn attempt_exec() -> Result<(), Errno> {
    const PATH: &CStr = c"/bin/true";
    let argv = [PATH.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: execve with a valid path and NULL-terminated argv/envp; it returns only on
    // failure (on success /bin/true exits 0, which the tests read as an escape too).
    check(unsafe {
        libc::syscall(
            libc::SYS_execve,
            PATH.as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
        )
    })?;
    Ok(())
}

fn attempt_ptrace(parent: libc::pid_t) -> Result<(), Errno> {
    let target = if parent == 0 { 1 } else { parent };
    // SAFETY: PTRACE_ATTACH takes a pid and no pointers.
    check(unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            libc::PTRACE_ATTACH,
            target,
            std::ptr::null::<libc::c_void>(),
            std::ptr::null::<libc::c_void>(),
        )
    })?;
    Ok(())
}
