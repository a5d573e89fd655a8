//! `dev-net`: atoll's virtio-net vhost-user backend.
//!
//! Inherited mode (started by the launcher, opens nothing):
//!   dev-net --socket-fd N --tap-fd M [--tap-fd M2 ...] [--mac MAC] [--mtu MTU]
//! Standalone mode (for use with other VMMs):
//!   dev-net --socket PATH --tap NAME [--queues PAIRS] [--mac MAC] [--mtu MTU]

#![forbid(unsafe_code)]

mod seccomp;

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{SockType, getsockopt, sockopt};
use tracing::{info, warn};
use vhost::vhost_user::Listener;

use dev_net::config::{MAX_QUEUE_PAIRS, MIN_MTU, MacAddr, NetParams};
use dev_net::tap::Pair;
use ipc::inherit::take_inherited_fd;

#[derive(Debug, Parser)]
#[command(
    name = "dev-net",
    version,
    about = "virtio-net vhost-user backend over the queues of a tap interface",
    long_about = "virtio-net vhost-user backend over the queues of a tap interface.\n\n\
        Inherited mode (as started by atoll): --socket-fd names an already bound and listening \
        UNIX stream socket and each --tap-fd an open tap queue (IFF_TAP | IFF_NO_PI | \
        IFF_VNET_HDR); one queue pair per --tap-fd. Nothing is opened. Standalone mode: --socket \
        is a path (the socket is created) and --tap an interface name; the tap is opened with \
        --queues queues, and created (and set up) if it does not exist, which needs \
        CAP_NET_ADMIN.\n\n\
        Offered: VERSION_1, EVENT_IDX, INDIRECT_DESC, MRG_RXBUF, MAC, STATUS, MQ, MTU (when \
        known), and the checksum and segmentation offloads the tap accepts. The control queue \
        is the frontend's business. After a frontend disconnects, dev-net accepts the next \
        connection on the same socket. SIGTERM or SIGINT makes it log its counters and exit \
        with status 0."
)]
struct Cli {
    /// Inherited listening vhost-user socket (bound, listening UNIX stream socket).
    #[arg(long, value_name = "N", requires = "tap_fd", conflicts_with_all = ["socket", "tap"])]
    socket_fd: Option<RawFd>,
    /// Inherited tap queue, opened with IFF_VNET_HDR; repeat once per queue pair.
    #[arg(long, value_name = "M", requires = "socket_fd")]
    tap_fd: Vec<RawFd>,
    /// Path of the vhost-user socket to create (standalone mode).
    #[arg(
        long,
        value_name = "PATH",
        requires = "tap",
        required_unless_present = "socket_fd"
    )]
    socket: Option<PathBuf>,
    /// Tap interface to open, or create (standalone mode).
    #[arg(long, value_name = "NAME", requires = "socket")]
    tap: Option<String>,
    /// Queue pairs, each served by its own thread on its own tap queue (standalone mode).
    #[arg(long, value_name = "PAIRS", requires = "tap",
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUE_PAIRS)))]
    queues: Option<u16>,
    /// MAC address of the NIC (default: derived from the tap's name).
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: Option<MacAddr>,
    /// MTU to advertise (default: the tap's MTU in standalone mode, none in inherited mode).
    #[arg(long, value_name = "MTU",
          value_parser = clap::value_parser!(u16).range(i64::from(MIN_MTU)..))]
    mtu: Option<u16>,
}

fn parse_mac(s: &str) -> Result<MacAddr, String> {
    MacAddr::parse(s).map_err(|e| e.to_string())
}

/// The tap queues to serve.
struct Taps {
    name: String,
    fds: Vec<OwnedFd>,
    multi_queue: bool,
}

fn inherited_listener(fd: RawFd) -> anyhow::Result<Listener> {
    let owned = take_inherited_fd(fd).with_context(|| format!("--socket-fd {fd}"))?;
    let ty = getsockopt(&owned, sockopt::SockType)
        .with_context(|| format!("--socket-fd {fd} is not a socket"))?;
    if ty != SockType::Stream {
        bail!("--socket-fd {fd} is a {ty:?} socket, not a stream socket");
    }
    if !getsockopt(&owned, sockopt::AcceptConn).context("--socket-fd: SO_ACCEPTCONN")? {
        bail!("--socket-fd {fd} is not listening");
    }
    let listener = UnixListener::from(owned);
    // The launcher may have left it non-blocking; the accept loop wants to block.
    listener
        .set_nonblocking(false)
        .context("--socket-fd: clearing O_NONBLOCK")?;
    Ok(Listener::from(listener))
}

fn inherited_taps(raw: &[RawFd]) -> anyhow::Result<Taps> {
    ensure!(
        raw.len() <= usize::from(MAX_QUEUE_PAIRS),
        "{} --tap-fd given; at most {MAX_QUEUE_PAIRS} queue pairs",
        raw.len()
    );
    let mut fds = Vec::with_capacity(raw.len());
    let mut first: Option<ipc::tap::TapInfo> = None;
    for &fd in raw {
        let owned = take_inherited_fd(fd).with_context(|| format!("--tap-fd {fd}"))?;
        let info = ipc::tap::tap_info(owned.as_fd()).with_context(|| format!("--tap-fd {fd}"))?;
        ensure!(
            info.is_tap,
            "--tap-fd {fd}: {} is a tun device, not a tap",
            info.name
        );
        ensure!(
            info.vnet_hdr,
            "--tap-fd {fd}: tap {} was opened without IFF_VNET_HDR (frames would carry no \
             virtio-net header)",
            info.name
        );
        if let Some(f) = &first {
            ensure!(
                info.name == f.name,
                "--tap-fd {fd} is a queue of {}, but the first --tap-fd is a queue of {}",
                info.name,
                f.name
            );
        } else {
            first = Some(info);
        }
        fds.push(owned);
    }
    let Some(info) = first else {
        bail!("--socket-fd needs at least one --tap-fd");
    };
    ensure!(
        fds.len() == 1 || info.multi_queue,
        "{} --tap-fd given but tap {} is single-queue",
        fds.len(),
        info.name
    );
    Ok(Taps {
        name: info.name,
        fds,
        multi_queue: info.multi_queue,
    })
}

fn standalone_taps(name: &str, pairs: u16) -> anyhow::Result<Taps> {
    let tap = ipc::tap::open_tap(name, pairs).with_context(|| format!("--tap {name}"))?;
    if tap.created {
        info!(tap = name, "created the tap");
        ipc::tap::set_link_up(name).with_context(|| format!("--tap {name}"))?;
    }
    let multi_queue = ipc::tap::tap_info(tap.fds[0].as_fd())
        .with_context(|| format!("--tap {name}"))?
        .multi_queue;
    Ok(Taps {
        name: tap.name,
        fds: tap.fds,
        multi_queue,
    })
}

fn main() -> anyhow::Result<()> {
    ipc::logging::init("dev-net", "warn");
    let cli = Cli::parse();

    // Block the termination signals before any thread exists, so that every thread inherits
    // the mask and only the signal thread below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking SIGTERM/SIGINT")?;

    let (taps, mut listener) = match (cli.socket_fd, &cli.socket, &cli.tap) {
        (Some(fd), _, _) => {
            let taps = inherited_taps(&cli.tap_fd)?;
            (taps, inherited_listener(fd)?)
        }
        (None, Some(path), Some(name)) => {
            let taps = standalone_taps(name, cli.queues.unwrap_or(1))?;
            let listener = Listener::new(path, true)
                .with_context(|| format!("--socket {}", path.display()))?;
            (taps, listener)
        }
        _ => bail!("either --socket-fd with --tap-fd, or --socket with --tap, is required"),
    };

    for (i, fd) in taps.fds.iter().enumerate() {
        let flags = fcntl(fd, FcntlArg::F_GETFL).with_context(|| format!("tap queue {i}"))?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(fd, FcntlArg::F_SETFL(flags)).with_context(|| format!("tap queue {i}"))?;
    }
    let first = taps.fds[0].as_fd();
    // VERSION_1 is always negotiated in practice: 12-byte headers from the start (the
    // features, once acked, set it again).
    ipc::tap::set_vnet_hdr_size(first, 12).context("tap vnet header size")?;
    let tap_offloads = ipc::tap::probe_offloads(first).context("probing the tap's offloads")?;
    let mtu = match (cli.mtu, &cli.tap) {
        (Some(mtu), _) => Some(mtu),
        (None, Some(name)) => {
            let mtu = ipc::tap::interface_mtu(name).with_context(|| format!("--tap {name}"))?;
            match u16::try_from(mtu) {
                Ok(m) if m >= MIN_MTU => Some(m),
                _ => {
                    warn!(
                        tap = name,
                        mtu, "tap MTU cannot be advertised; not offering it"
                    );
                    None
                }
            }
        }
        (None, None) => None,
    };
    let pairs_n = u16::try_from(taps.fds.len()).context("queue pairs")?;
    let params = NetParams {
        pairs: pairs_n,
        mac: cli.mac.unwrap_or_else(|| MacAddr::derived(&taps.name)),
        mtu,
        tap_offloads,
    };
    let multi_queue = taps.multi_queue;
    // Confinement (ipc::sandbox): from here on no path, no new socket, no new interface;
    // only the taps and the listener. Before any thread, as Landlock and capabilities are per
    // thread.
    let mut policy = seccomp::policy(cli.socket.is_some()).expect_fds(
        taps.fds
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain([listener.as_raw_fd()]),
    );
    if let Some(dir) = cli.socket.as_deref().and_then(|p| p.parent()) {
        // Standalone: the signal thread removes the socket it created.
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        policy = policy.allow_remove_beneath(dir);
    }
    // The daemon's private socket behind the relay (bound before lockdown).
    let inner = dev_net::relay::Inner::bind().context("the relay's socket")?;
    let policy = policy.expect_fds(inner.fds());
    let report = ipc::sandbox::lockdown(&policy).context("confining dev-net")?;
    info!("{report}");
    let pairs: Vec<Arc<Pair>> = taps
        .fds
        .into_iter()
        .zip(0u16..)
        .map(|(fd, i)| Arc::new(Pair::new(i, fd, i == 0 || !multi_queue)))
        .collect();
    info!(
        tap = taps.name,
        pairs = pairs_n,
        mac = %params.mac,
        mtu = ?params.mtu,
        tap_offloads = format_args!("{tap_offloads:#x}"),
        features = format_args!("{:#x}", params.features()),
        "serving"
    );

    let signal_pairs = pairs.clone();
    let socket_path = cli.socket.clone();
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            let sig = signals.wait();
            for pair in &signal_pairs {
                let stats = pair.worker().stats();
                info!(pair = pair.index(), "rx: {}", stats.rx);
                info!(pair = pair.index(), "tx: {}", stats.tx);
            }
            info!(signal = ?sig, "exiting");
            if let Some(path) = socket_path {
                let _ = std::fs::remove_file(path);
            }
            std::process::exit(0);
        })
        .context("spawning the signal thread")?;

    dev_net::server::serve(&mut listener, &inner, &params, &pairs)?;
    Ok(())
}
