//! dev-net's seccomp allow-list, installed by `ipc::sandbox::lockdown` once the taps and the
//! listening socket are set up and before the signal thread or any vhost-user thread starts.
//!
//! Provenance: the calls of `server.rs`, `backend.rs`, `worker.rs` and `tap.rs` (and of
//! `ipc::tap` at run time: `TUNSETOFFLOAD` when the driver's features arrive,
//! `TUNSETVNETHDRSZ`, `TUNSETQUEUE` when a queue pair is enabled or disabled, one `writev`
//! per transmitted frame), of the crates they drive (`vhost-user-backend`'s daemon and vring
//! workers, `vhost`'s listener, `vm-memory`'s mmap of the guest-RAM memfd) and of `main.rs`'s
//! signal thread. Opening taps, `TUNSETIFF`, the offload probe and the MTU query (an AF_INET
//! socket, standalone mode only) all happen before lockdown.

use ipc::sandbox::policy::Policy;

/// The policy; `standalone_socket` when dev-net created its socket at a path (`--socket`) and
/// removes it when it exits.
pub fn policy(standalone_socket: bool) -> Policy {
    let p = Policy::runtime("dev-net")
        .allow(&[
            // Frames: reading the tap, one gathered write per transmitted frame.
            libc::SYS_read,
            libc::SYS_writev,
            // vhost-user: accepting the frontend, messages with descriptors attached, socket
            // checks, dropping a connection.
            libc::SYS_accept4,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_getsockopt,
            libc::SYS_shutdown,
            // The relay (relay.rs): std's socket reads and writes are recv/send.
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            // Event loops: tap, kick, call and exit eventfds under epoll.
            libc::SYS_eventfd2,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            // The signal thread (sigwait on SIGTERM/SIGINT).
            libc::SYS_rt_sigtimedwait,
        ])
        .allow_ioctls(&[
            request(libc::TUNSETOFFLOAD),
            request(libc::TUNSETVNETHDRSZ),
            request(libc::TUNSETQUEUE),
        ])
        .allow_arg_values(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u32]);
    if standalone_socket {
        p.allow(&[libc::SYS_unlink])
    } else {
        p
    }
}

/// An ioctl request number as the filter compares it (the kernel's `unsigned int cmd`).
fn request(r: u64) -> u32 {
    u32::try_from(r).expect("ioctl request numbers are 32 bits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::sandbox::policy::Violation;

    #[test]
    fn compiles_and_keeps_paths_sockets_and_tap_creation_out() {
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
            ] {
                assert!(!p.lists(nr), "syscall {nr}");
            }
            assert_eq!(p.lists(libc::SYS_unlink), standalone);
        }
    }
}
