//! `dev-blk`: atoll's virtio-blk vhost-user backend.
//!
//! Inherited mode (started by the launcher, opens no path):
//!   dev-blk --socket-fd N --image-fd M [--readonly] [--queues Q] [--serial ID]
//! Standalone mode (for use with other VMMs):
//!   dev-blk --socket PATH --image PATH [--readonly] [--direct] [--queues Q] [--serial ID]

#![forbid(unsafe_code)]

mod seccomp;

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{SockType, getsockopt, sockopt};
use tracing::{info, warn};
use vhost::vhost_user::Listener;

use dev_blk::config::{self, DiskGeometry, ID_BYTES, MAX_QUEUE_SIZE, MAX_QUEUES};
use dev_blk::disk::RawImage;
use ipc::inherit::take_inherited_fd;

#[derive(Debug, Parser)]
#[command(
    name = "dev-blk",
    version,
    about = "virtio-blk vhost-user backend over a raw image file",
    long_about = "virtio-blk vhost-user backend over a raw image file.\n\n\
        Inherited mode (as started by atoll): --socket-fd and --image-fd name an already \
        bound and listening UNIX stream socket and an already opened image; no path is ever \
        opened. Standalone mode: --socket and --image are paths (the socket is created).\n\n\
        After a frontend disconnects, dev-blk accepts the next connection on the same socket. \
        SIGTERM or SIGINT makes it flush the image and exit with status 0."
)]
struct Cli {
    /// Inherited listening vhost-user socket (bound, listening UNIX stream socket).
    #[arg(long, value_name = "N", requires = "image_fd", conflicts_with_all = ["socket", "image"])]
    socket_fd: Option<RawFd>,
    /// Inherited image descriptor, opened O_RDONLY for read-only disks and with O_DIRECT
    /// for direct I/O.
    #[arg(
        long,
        value_name = "M",
        requires = "socket_fd",
        conflicts_with = "direct"
    )]
    image_fd: Option<RawFd>,
    /// Path of the vhost-user socket to create (standalone mode).
    #[arg(
        long,
        value_name = "PATH",
        requires = "image",
        required_unless_present = "socket_fd"
    )]
    socket: Option<PathBuf>,
    /// Path of the raw image (standalone mode).
    #[arg(long, value_name = "PATH", requires = "socket")]
    image: Option<PathBuf>,
    /// Serve the disk read-only (VIRTIO_BLK_F_RO); every write is refused.
    #[arg(long)]
    readonly: bool,
    /// Open the image with O_DIRECT (standalone mode; in inherited mode the descriptor's own
    /// flags decide).
    #[arg(long)]
    direct: bool,
    /// Number of request queues, each served by its own thread.
    #[arg(long, value_name = "Q", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
    queues: u16,
    /// GET_ID string (at most 20 bytes); default: derived from the image's device and inode.
    #[arg(long, value_name = "ID", value_parser = parse_serial)]
    serial: Option<[u8; ID_BYTES]>,
}

fn parse_serial(s: &str) -> Result<[u8; ID_BYTES], String> {
    config::serial_from_str(s)
        .ok_or_else(|| format!("serial {s:?} is {} bytes, longer than {ID_BYTES}", s.len()))
}

/// Takes ownership of an inherited descriptor (see [`ipc::inherit`]).
fn inherited(fd: RawFd, what: &str) -> anyhow::Result<OwnedFd> {
    take_inherited_fd(fd).with_context(|| format!("--{what} {fd}"))
}

fn inherited_listener(fd: RawFd) -> anyhow::Result<Listener> {
    let owned = inherited(fd, "socket-fd")?;
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

fn open_image(cli: &Cli) -> anyhow::Result<File> {
    if let Some(fd) = cli.image_fd {
        return Ok(File::from(inherited(fd, "image-fd")?));
    }
    let Some(path) = &cli.image else {
        bail!("either --image-fd or --image is required");
    };
    let mut opts = OpenOptions::new();
    opts.read(true).write(!cli.readonly);
    if cli.direct {
        opts.custom_flags(libc::O_DIRECT);
    }
    opts.open(path)
        .with_context(|| format!("--image {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    ipc::logging::init("dev-blk", "warn");
    let cli = Cli::parse();

    // Block the termination signals before any thread exists, so that every thread inherits
    // the mask and only the signal thread below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("blocking SIGTERM/SIGINT")?;

    let image_file = open_image(&cli)?;
    let image_fd = image_file.as_raw_fd();
    let image = Arc::new(RawImage::new(image_file, cli.readonly)?);
    let serial = cli.serial.unwrap_or_else(|| {
        let (dev, ino) = image.identity();
        config::serial_from_identity(dev, ino)
    });
    let geometry = DiskGeometry {
        capacity_sectors: image.capacity_sectors(),
        readonly: image.readonly(),
        serial,
        num_queues: cli.queues,
        queue_size: MAX_QUEUE_SIZE,
        physical_block_size: image.physical_block_size(),
    };
    let mut listener = match (cli.socket_fd, &cli.socket) {
        (Some(fd), _) => inherited_listener(fd)?,
        (None, Some(path)) => {
            Listener::new(path, true).with_context(|| format!("--socket {}", path.display()))?
        }
        (None, None) => bail!("either --socket-fd or --socket is required"),
    };
    // Confinement (ipc::sandbox): from here on no path, no new socket, only the image and
    // the listener; before any thread, as Landlock and capabilities are per thread.
    let mut policy =
        seccomp::policy(cli.socket.is_some()).expect_fds([image_fd, listener.as_raw_fd()]);
    if let Some(dir) = cli.socket.as_deref().and_then(|p| p.parent()) {
        // Standalone: the signal thread removes the socket it created.
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        policy = policy.allow_remove_beneath(dir);
    }
    let report = ipc::sandbox::lockdown(&policy).context("confining dev-blk")?;
    info!("{report}");
    info!(
        capacity_sectors = geometry.capacity_sectors,
        readonly = geometry.readonly,
        direct_alignment = ?image.direct_alignment(),
        queues = geometry.num_queues,
        serial = %String::from_utf8_lossy(&serial).trim_end_matches('\0'),
        "serving"
    );

    let signal_image = Arc::clone(&image);
    let socket_path = cli.socket.clone();
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            let sig = signals.wait();
            info!(signal = ?sig, "exiting");
            if let Err(e) = signal_image.sync() {
                warn!("final flush of the image failed: {e}");
            }
            if let Some(path) = socket_path {
                let _ = std::fs::remove_file(path);
            }
            std::process::exit(0);
        })
        .context("spawning the signal thread")?;

    dev_blk::server::serve(&mut listener, &image, &geometry)?;
    Ok(())
}
