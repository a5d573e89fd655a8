//! dev-net with a VMM no one here wrote: on this machine, Debian's QEMU (TCG, memfd guest RAM,
//! `-netdev vhost-user` with `-device virtio-net-pci`) boots the Debian kernel with one network
//! card served by a standalone `dev-net --socket PATH --tap NAME`.
//!
//! The tap lives in a private network namespace made for the run (`atoll-netqemu-<pid>`, deleted
//! afterwards, with everything in it), so nothing here can touch the machine's own interfaces
//! or addresses. In that namespace the test plays L1's part: the tap is `10.213.N.1/24`, busybox
//! `httpd` serves a random `h2g.bin`, and once the guest serves its own `g2h.bin` the test pings
//! the guest, fetches that file and publishes `done`. The guest pings the host and fetches
//! `h2g.bin` ([`atoll_tests::net`]); every transfer is checked by md5 at both ends. QEMU itself
//! stays in the machine's namespace: it reaches dev-net through the socket's path only.
//! Needs `cargo build --release` first.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use atoll_tests::Testbed;
use atoll_tests::blk::md5sum;
use atoll_tests::cmd::{KILLED_STATUS, TIMEOUT_STATUS, TimedCommand};
use atoll_tests::l2::{self, GuestEnd, L2Boot, L2Outcome, Vmm};
use atoll_tests::net::{self, Card, GUEST_MODULES, TRANSFER_MIB};
use atoll_tests::paths;

/// QEMU-TCG on this machine boots the guest in about 10 s; the transfers add a few seconds.
const QEMU_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the guest waits for the host to finish its side.
const GUEST_WAIT_SECS: u64 = 120;
const MAC: &str = "52:54:00:ab:cd:ef";
/// Names of this test's network namespaces: the prefix, then the test process's pid.
const NETNS_PREFIX: &str = "atoll-netqemu-";

/// Output of a finished command, for messages.
fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_owned()
}

/// Sends SIGTERM to `child` and waits at most 20 s for it to exit.
fn terminate(child: &mut Child, what: &str) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    TimedCommand::new("kill", Duration::from_secs(10))
        .args(["-TERM", &child.id().to_string()])
        .output_ok()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        ensure!(Instant::now() < deadline, "{what} ignored SIGTERM for 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills `child` (SIGKILL) unless it has already exited, and reaps it.
fn kill(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The private network namespace and what runs in it.
// ---------------------------------------------------------------------------------------------

/// A network namespace of this test, deleted on drop after the processes started in it with
/// [`NetNs::spawn`] were killed.
struct NetNs {
    name: String,
    /// Background processes in the namespace (busybox httpd).
    children: Vec<Child>,
}

impl NetNs {
    /// Deletes the namespaces of earlier runs whose process is gone, then creates this run's
    /// with its loopback up.
    fn create() -> Result<Self> {
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for entry in entries.filter_map(Result::ok) {
                let file_name = entry.file_name();
                let Some(pid) = file_name
                    .to_str()
                    .and_then(|n| n.strip_prefix(NETNS_PREFIX))
                    .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
                else {
                    continue;
                };
                if !Path::new("/proc").join(pid).exists() {
                    let _ = TimedCommand::new("ip", Duration::from_secs(30))
                        .args(["netns", "del"])
                        .arg(&file_name)
                        .output();
                }
            }
        }
        let name = format!("{NETNS_PREFIX}{}", std::process::id());
        // A namespace of this name can only be left over by an earlier process with this pid.
        let _ = TimedCommand::new("ip", Duration::from_secs(30))
            .args(["netns", "del", &name])
            .output();
        TimedCommand::new("ip", Duration::from_secs(30))
            .args(["netns", "add", &name])
            .output_ok()
            .context("creating a network namespace (needs root and `ip` from iproute2)")?;
        let ns = Self {
            name,
            children: Vec::new(),
        };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec <name> <args>` (which execs the program: its pid is the child's).
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command
    }

    /// Runs `args` in the namespace; a non-zero exit is an error.
    fn run(&self, args: &[&str]) -> Result<()> {
        TimedCommand::new("ip", Duration::from_secs(60))
            .args(["netns", "exec", &self.name])
            .args(args)
            .output_ok()?;
        Ok(())
    }

    /// Runs `args` in the namespace for at most `limit`, whatever its exit status.
    fn output(&self, args: &[&str], limit: Duration) -> Result<std::process::Output> {
        Ok(TimedCommand::new("ip", limit)
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()?)
    }

    /// Starts `args` in the background in the namespace; killed when the namespace is dropped.
    fn spawn(&mut self, args: &[&str], log: &Path) -> Result<()> {
        let log_file = std::fs::File::create(log)?;
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {args:?} in {}", self.name))?;
        self.children.push(child);
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for child in &mut self.children {
            kill(child);
        }
        // Deleting the namespace destroys the tap in it.
        let _ = TimedCommand::new("ip", Duration::from_secs(30))
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A standalone `dev-net` in the namespace, killed if the test ends before it was stopped.
struct DevNet {
    child: Child,
    log: PathBuf,
}

impl DevNet {
    /// Starts `dev-net --socket <work>/net.sock --tap <tap> --mac MAC` in `ns` and waits for
    /// its socket.
    fn start(ns: &NetNs, work: &Path, tap: &str) -> Result<(Self, PathBuf)> {
        let bin = paths::require_release_bin("dev-net")?;
        let socket = work.join("net.sock");
        let log = work.join("dev-net.log");
        let log_file = std::fs::File::create(&log)?;
        let bin = bin.to_string_lossy();
        let socket_arg = socket.to_string_lossy();
        let child = ns
            .command(&[&bin, "--socket", &socket_arg, "--tap", tap, "--mac", MAC])
            .env("ATOLL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting dev-net")?;
        let mut dev = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(status) = dev.child.try_wait()? {
                bail!(
                    "dev-net exited ({status}) before listening; {}",
                    dev.log_text()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "dev-net did not create {} within 20 s; {}",
                socket.display(),
                dev.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((dev, socket))
    }

    fn log_text(&self) -> String {
        format!(
            "its log ({}):\n{}",
            self.log.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for DevNet {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// QEMU running in the background, stopped (SIGTERM to its `timeout`) if the test ends first.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = terminate(&mut self.0, "qemu");
        kill(&mut self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The run.
// ---------------------------------------------------------------------------------------------

struct QemuRun {
    outcome: L2Outcome,
    /// md5 of the `h2g.bin` the host served.
    h2g_md5: String,
    /// md5 of the `g2h.bin` the host fetched from the guest (or why there is none).
    g2h_md5: String,
    /// The host's ping of the guest: success, and its output.
    ping_ok: bool,
    ping_log: String,
    /// Seconds from QEMU's start until the guest served `g2h.bin`.
    serving_after: f64,
    /// Whether dev-net was still running when QEMU had exited.
    dev_net_alive_after_qemu: bool,
    /// How dev-net ended after SIGTERM, with its log.
    dev_net_end: (ExitStatus, String),
}

fn write_random(path: &Path, mib: u32) -> Result<()> {
    let len = u64::from(mib) << 20;
    let mut bytes = Vec::new();
    std::fs::File::open("/dev/urandom")?
        .take(len)
        .read_to_end(&mut bytes)?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn run_qemu() -> Result<QemuRun> {
    let pid = std::process::id();
    let testbed = Testbed::setup()?;
    let work = testbed.work_dir("net-qemu")?;
    let initramfs = work.join("net.cpio");
    testbed.write_l2_initramfs(&initramfs, GUEST_MODULES, &net::guest_init())?;

    // Private namespace: the subnet cannot clash with the machine's, but stays in 10.213.x.
    let subnet = format!("10.213.{}", 20 + pid % 200);
    let tap = format!("anq{pid}");
    let card = Card {
        tap: tap.clone(),
        multi_queue: false,
        // This card is QEMU's, not atoll's `--net`: its `-device` value. `vectors=0` (INTx, no
        // MSI-X): Debian's QEMU 7.2 under TCG dereferences its never-allocated KVM irqfd table
        // (`kvm_virtio_pci_irqfd_use` from `virtio_pci_vector_unmask`) and segfaults when a
        // virtio-net driver on a vhost-user netdev sets DRIVER_OK with MSI-X enabled.
        net: format!("virtio-net-pci,netdev=n0,mac={MAC},vectors=0"),
        mac: Some(MAC.into()),
        subnet: subnet.clone(),
    };
    let mut ns = NetNs::create()?;
    ns.run(&["ip", "tuntap", "add", &tap, "mode", "tap"])?;
    ns.run(&["ip", "addr", "add", &format!("{subnet}.1/24"), "dev", &tap])?;
    ns.run(&["ip", "link", "set", &tap, "up"])?;

    let www = work.join("www");
    std::fs::create_dir_all(&www)?;
    let h2g = www.join("h2g.bin");
    write_random(&h2g, TRANSFER_MIB)?;
    let h2g_md5 = md5sum(&h2g)?;
    let www_arg = www.to_string_lossy().into_owned();
    ns.spawn(
        &[
            "busybox",
            "httpd",
            "-f",
            "-p",
            &format!("{subnet}.1:8080"),
            "-h",
            &www_arg,
        ],
        &work.join("httpd.log"),
    )?;

    let (mut dev_net, socket) = DevNet::start(&ns, &work, &tap)?;

    let boot = L2Boot {
        name: "qemu-dev-net".into(),
        vmm: Vmm::Qemu,
        cpus: 1,
        memory_mib: 256,
        cmdline: format!(
            "{} panic=-1",
            net::guest_cmdline(std::slice::from_ref(&card), GUEST_WAIT_SECS)
        ),
        initramfs: initramfs.clone(),
        timeout: QEMU_TIMEOUT,
    };
    let log = work.join(format!("{}.log", boot.name));
    let log_file = std::fs::File::create(&log)?;
    let memory = format!("{}M", boot.memory_mib);
    let started = Instant::now();
    let mut qemu = Qemu(
        Command::new("timeout")
            .args(["-k", "10", &QEMU_TIMEOUT.as_secs().to_string()])
            .arg("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", &memory])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
            ])
            .args(["-numa", "node,memdev=mem"])
            .args([
                "-chardev",
                &format!("socket,id=c0,path={}", socket.display()),
            ])
            .args(["-netdev", "vhost-user,id=n0,chardev=c0"])
            .args(["-device", &card.net])
            .args(["-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&testbed.kernel.vmlinuz)
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", &boot.cmdline])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting qemu-system-x86_64")?,
    );

    // The host's side, as `net::l1_script` does it in L1: wait until the guest serves
    // g2h.bin, ping it, fetch g2h.bin, publish `done`.
    // No `wget -T`: Debian 12's static busybox (1.35.0) segfaults with it; `TimedCommand`
    // bounds each fetch instead.
    let guest_url = format!("http://{subnet}.2:8080/g2h.bin");
    let mut serving_after = None;
    while started.elapsed() < QEMU_TIMEOUT && qemu.0.try_wait()?.is_none() {
        let probe = ns.output(
            &["busybox", "wget", "-q", "-O", "/dev/null", &guest_url],
            Duration::from_secs(10),
        );
        if probe.is_ok_and(|p| p.status.success()) {
            serving_after = Some(started.elapsed().as_secs_f64());
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let (ping_ok, ping_log, g2h_md5) = if serving_after.is_some() {
        let guest = format!("{subnet}.2");
        let ping = ns.output(
            &["busybox", "ping", "-c", "3", "-W", "5", &guest],
            Duration::from_secs(60),
        )?;
        let g2h = work.join("g2h.bin");
        let g2h_arg = g2h.to_string_lossy();
        let fetch = ns.output(
            &["busybox", "wget", "-q", "-O", &g2h_arg, &guest_url],
            Duration::from_secs(120),
        );
        let g2h_md5 = match fetch {
            Ok(f) if f.status.success() => md5sum(&g2h)?,
            Ok(f) => format!("wget failed ({}): {}", f.status, output_text(&f)),
            Err(e) => format!("{e:#}"),
        };
        (ping.status.success(), output_text(&ping), g2h_md5)
    } else {
        (
            false,
            "not run: the guest never served g2h.bin".to_owned(),
            "not fetched: the guest never served g2h.bin".to_owned(),
        )
    };
    std::fs::write(www.join("done"), b"done\n")?;

    let status = qemu.0.wait().context("waiting for qemu")?;
    let dev_net_alive_after_qemu = dev_net.child.try_wait()?.is_none();
    let dev_net_status = terminate(&mut dev_net.child, "dev-net")?;
    let dev_net_end = (dev_net_status, dev_net.log_text());
    drop(ns);

    let console = String::from_utf8_lossy(&std::fs::read(&log)?).into_owned();
    let outcome = L2Outcome {
        boot,
        status: status.code(),
        facts: l2::parse_facts(&console),
        console,
        log,
    };
    eprintln!(
        "QEMU on dev-net: guest serving after {}, QEMU done after {:.1} s",
        serving_after.map_or_else(|| "never".to_owned(), |s| format!("{s:.1} s")),
        started.elapsed().as_secs_f64()
    );
    Ok(QemuRun {
        outcome,
        h2g_md5,
        g2h_md5,
        ping_ok,
        ping_log,
        serving_after: serving_after.unwrap_or(f64::NAN),
        dev_net_alive_after_qemu,
        dev_net_end,
    })
}

fn qemu_run() -> &'static QemuRun {
    static RUN: OnceLock<Result<QemuRun, String>> = OnceLock::new();
    RUN.get_or_init(|| run_qemu().map_err(|e| format!("{e:#}")))
        .as_ref()
        .unwrap_or_else(|e| panic!("the QEMU run failed: {e}"))
}

impl QemuRun {
    /// For assertion messages: the boot, its console's tail and dev-net's log.
    fn why(&self) -> String {
        format!(
            "{}\ndev-net ended with {}; {}",
            self.outcome.describe(),
            self.dev_net_end.0,
            self.dev_net_end.1
        )
    }

    /// The guest booted, loaded its modules, finished its part and powered off.
    fn assert_guest_ran(&self) {
        let o = &self.outcome;
        let why = self.why();
        assert!(
            !matches!(o.status, Some(TIMEOUT_STATUS | KILLED_STATUS)),
            "the guest ran out of time: {why}"
        );
        assert_eq!(o.fact("INIT"), Some("started"), "/init never ran: {why}");
        assert_eq!(o.fact("MODULES_FAILED"), Some(""), "insmod failed: {why}");
        assert_eq!(o.fact("L1_DONE"), Some("ok"), "{why}");
        assert_eq!(o.guest_end(), GuestEnd::PowerOff, "{why}");
    }
}

#[test]
fn qemu_guest_sees_a_virtio_net_card_with_the_given_mac() {
    let run = qemu_run();
    run.assert_guest_ran();
    let o = &run.outcome;
    let why = run.why();
    assert_eq!(o.fact("NIC0_IF"), Some("eth0"), "{why}");
    assert_eq!(o.fact("NIC0_MAC"), Some(MAC), "{why}");
    assert_eq!(o.fact("NIC0_DRIVER"), Some("virtio_net"), "{why}");
    assert_eq!(o.fact("NIC0_CARRIER"), Some("1"), "{why}");
}

#[test]
fn qemu_guest_and_host_ping_each_other_over_dev_net() {
    let run = qemu_run();
    run.assert_guest_ran();
    let why = run.why();
    assert_eq!(
        run.outcome.fact("NIC0_PING"),
        Some("ok"),
        "the guest's ping of the host: {why}"
    );
    assert!(
        run.ping_ok,
        "the host's ping of the guest (serving after {:.1} s): {}\n{why}",
        run.serving_after, run.ping_log
    );
}

#[test]
fn files_cross_dev_net_both_ways_with_matching_md5s() {
    let run = qemu_run();
    run.assert_guest_ran();
    let o = &run.outcome;
    let why = run.why();
    assert_eq!(
        o.fact("NIC0_H2G_MD5"),
        Some(run.h2g_md5.as_str()),
        "the guest's md5 of h2g.bin is not the host's: {why}"
    );
    let g2h = o.fact("G2H_MD5");
    assert!(
        g2h.is_some_and(|m| m.len() == 32),
        "the guest reported no md5 of g2h.bin: {why}"
    );
    assert_eq!(
        Some(run.g2h_md5.as_str()),
        g2h,
        "the host's md5 of g2h.bin fetched from the guest is not the guest's: {why}"
    );
}

#[test]
fn dev_net_serves_until_qemu_exits_then_exits_0_on_sigterm() {
    let run = qemu_run();
    let (status, log) = &run.dev_net_end;
    assert!(
        run.dev_net_alive_after_qemu,
        "dev-net exited ({status}) before QEMU did; {log}"
    );
    assert!(status.success(), "dev-net ended with {status}; {log}");
}
