//! Starting a child process as a fresh `exec` of its own binary with an explicit list of
//! inherited descriptors: nothing else crosses the `exec` (no fork-without-exec, no stray fds).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// A descriptor the child inherits, and the number it gets there.
#[derive(Clone, Copy, Debug)]
pub struct Inherit<'a> {
    pub fd: BorrowedFd<'a>,
    pub target: RawFd,
}

/// Spawns `cmd` so that it inherits exactly stdio plus `fds` (each at its `target` number);
/// every other descriptor of the parent is closed at `exec`. The child is killed if the parent
/// dies (`PR_SET_PDEATHSIG`).
pub fn spawn_with_fds(cmd: &mut Command, fds: &[Inherit<'_>]) -> io::Result<Child> {
    let pairs: Vec<(RawFd, RawFd)> = fds.iter().map(|i| (i.fd.as_raw_fd(), i.target)).collect();
    if pairs.iter().any(|&(_, t)| t < 3) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fd targets 0..=2 are stdio",
        ));
    }
    let max_target = pairs.iter().map(|&(_, t)| t).max().unwrap_or(2);
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // syscalls (prctl, fcntl, dup2, close_range); it touches no locks or allocations.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Move every source above all targets first so that no dup2 clobbers a source
            // that is still to be placed.
            let mut moved = [0 as RawFd; 64];
            if pairs.len() > moved.len() {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            for (slot, &(src, _)) in moved.iter_mut().zip(pairs.iter()) {
                let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, max_target + 1);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                *slot = fd;
            }
            for (&fd, &(_, target)) in moved.iter().zip(pairs.iter()) {
                // dup2 clears FD_CLOEXEC on the new descriptor, so it survives exec.
                if libc::dup2(fd, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Everything above the targets (including the temporaries) closes at exec. Marking
            // instead of closing keeps std's exec-error pipe working.
            let first = u32::try_from(max_target + 1).unwrap_or(u32::MAX);
            if libc::syscall(
                libc::SYS_close_range,
                first,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Anything between stdio and the highest target that is not a target closes too.
            for fd in 3..=max_target {
                if !pairs.iter().any(|&(_, t)| t == fd) {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn child_sees_exactly_the_listed_fds() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let (_keep_r, stray) = nix::unistd::pipe().unwrap();
        // The stray pipe is made inheritable on purpose: spawn_with_fds must still close it.
        nix::fcntl::fcntl(
            &stray,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "ls /proc/self/fd | sort -n | tr '\\n' ' ' >&7"]);
        let mut child = spawn_with_fds(
            &mut cmd,
            &[Inherit {
                fd: w.as_fd(),
                target: 7,
            }],
        )
        .unwrap();
        drop(w);
        assert!(child.wait().unwrap().success());
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut out).unwrap();
        // 0,1,2, 7, plus the fd `ls` opens for /proc/self/fd itself.
        let fds: Vec<i32> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
        assert!(fds.contains(&7), "{out}");
        assert!(
            fds.iter().all(|&f| f <= 7 || f == fds[fds.len() - 1]),
            "{out}"
        );
        assert!(
            !fds.contains(&stray.as_raw_fd()) || stray.as_raw_fd() == 7,
            "{out}"
        );
    }
}
