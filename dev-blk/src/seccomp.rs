//! dev-blk's seccomp allow-list, installed by `ipc::sandbox::lockdown` once the image and the
//! listening socket are open and before the signal thread or any vhost-user thread starts.
//!
//! Provenance: the calls of `server.rs`, `backend.rs`, `worker.rs` and `disk.rs` (and of
//! `ipc::guest_io`), of the crates they drive (`vhost-user-backend`'s daemon and vring
//! workers, `vhost`'s listener and message endpoint, `vm-memory`'s mmap of the guest-RAM
//! memfd), and of `main.rs`'s signal thread; then checked by running dev-blk's process tests
//! (`tests/process.rs`, which drive the real binary over its socket) with the filter in log
//! mode and reading the kernel's seccomp audit records (none left).

use ipc::sandbox::policy::Policy;

/// The policy; `standalone_socket` when dev-blk created its socket at a path (`--socket`)
/// and removes it when it exits (`unlink`; Landlock allows it beneath that directory only).
pub fn policy(standalone_socket: bool) -> Policy {
    let p = Policy::runtime("dev-blk")
        .allow(&[
            // Image I/O (disk.rs, ipc::guest_io): vectored positioned I/O between the image
            // and guest memory, the O_DIRECT bounce buffer and zero-fill (pread64/pwrite64),
            // flushes, discard/write-zeroes.
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            // vhost-user: accepting the frontend, messages with descriptors attached, the
            // backend handler's socket checks, dropping a connection.
            libc::SYS_accept4,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_read,
            libc::SYS_getsockopt,
            libc::SYS_shutdown,
            // The daemon's and workers' event loops: kick/call/exit eventfds under epoll.
            libc::SYS_eventfd2,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            // The signal thread (sigwait on SIGTERM/SIGINT).
            libc::SYS_rt_sigtimedwait,
        ])
        // Duplicating descriptors (vhost-user-backend clones the kick/call eventfds and the
        // connection it hands to its threads). No ioctl at all.
        .allow_arg_values(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u32]);
    if standalone_socket {
        p.allow(&[libc::SYS_unlink])
    } else {
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::sandbox::policy::Violation;

    #[test]
    fn compiles_and_keeps_paths_and_sockets_out() {
        for standalone in [false, true] {
            let p = policy(standalone);
            p.compile(Violation::Kill).unwrap();
            for nr in [
                libc::SYS_openat,
                libc::SYS_open,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_bind,
                libc::SYS_execve,
                libc::SYS_ptrace,
                libc::SYS_ioctl,
            ] {
                assert!(!p.lists(nr), "syscall {nr}");
            }
            assert_eq!(p.lists(libc::SYS_unlink), standalone);
        }
    }
}
