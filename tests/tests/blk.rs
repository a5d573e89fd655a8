//! Block devices end to end, with software no one here wrote on the other side:
//!
//! - on this machine, Debian's QEMU (TCG, memfd guest RAM, `-device vhost-user-blk-pci`)
//!   boots the Debian kernel on two disks served by standalone `dev-blk` processes, one of
//!   them read-only;
//! - in one L1 session (TESTBED.md), atoll boots the same guest with
//!   `--disk path=a.img --disk path=b.img,readonly=on` (the command line), then with a
//!   qemu-storage-daemon `vhost-user-blk` export through `--disk socket=` next to a dev-blk
//!   disk with `queues=2`.
//!
//! The guest reports what it sees and writes a marker with fsync; the images stay on the host
//! (on the 9p work share in L1), and this process checks them with the md5s and bytes it
//! recorded when it created them. Needs `cargo build --release` first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use atoll_tests::Testbed;
use atoll_tests::blk::{
    self, AtollDiskBoot, GUEST_MODULES, MARKER_OFFSET, QsdExport, TestImage, disk_fact,
};
use atoll_tests::cmd::{KILLED_STATUS, TIMEOUT_STATUS, TimedCommand};
use atoll_tests::l2::{self, GuestEnd, L2Boot, L2Outcome, Vmm};
use atoll_tests::paths;

/// The QEMU run on this machine and the L1 session each want both cores: never both at once.
static HEAVY: Mutex<()> = Mutex::new(());

/// An L2 boot in L1 takes 10-20 s on an idle 2-core host, over a minute on a busy one.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// QEMU-TCG on this machine boots the guest in about 10 s.
const QEMU_TIMEOUT: Duration = Duration::from_secs(180);

const A_SIZE: usize = 8 << 20;
const B_SIZE: usize = 4 << 20;

fn sectors(bytes: usize) -> String {
    (bytes / 512).to_string()
}

// ---------------------------------------------------------------------------------------------
// Debian's QEMU on dev-blk, on this machine.
// ---------------------------------------------------------------------------------------------

/// A standalone `dev-blk`, killed if the test ends before it was stopped.
struct DevBlk {
    child: Child,
    log: PathBuf,
}

impl DevBlk {
    /// Starts `dev-blk --socket <socket> --image <image> <extra>` and waits for its socket.
    fn start(work: &Path, name: &str, image: &Path, extra: &[&str]) -> Result<(Self, PathBuf)> {
        let socket = work.join(format!("{name}.sock"));
        let log = work.join(format!("{name}.dev-blk.log"));
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(paths::require_release_bin("dev-blk")?)
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(image)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting dev-blk")?;
        let mut dev = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(status) = dev.child.try_wait()? {
                bail!(
                    "dev-blk exited ({status}) before listening; {}",
                    dev.log_text()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "dev-blk did not create {} within 20 s; {}",
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

    /// SIGTERM, then its exit status (it flushes the image and exits 0).
    fn stop(&mut self) -> Result<ExitStatus> {
        TimedCommand::new("kill", Duration::from_secs(10))
            .args(["-TERM", &self.child.id().to_string()])
            .output_ok()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "dev-blk ignored SIGTERM for 20 s; {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DevBlk {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct QemuRun {
    outcome: L2Outcome,
    a: TestImage,
    b: TestImage,
    nonce: String,
    /// How each dev-blk ended after SIGTERM, with its log.
    dev_blk_ends: Vec<(ExitStatus, String)>,
}

fn run_qemu() -> Result<QemuRun> {
    let testbed = Testbed::setup()?;
    let work = testbed.work_dir("blk-qemu")?;
    let initramfs = work.join("blk.cpio");
    testbed.write_l2_initramfs(&initramfs, GUEST_MODULES, &blk::guest_init())?;
    let a = TestImage::create(&work.join("a.img"), A_SIZE)?;
    let b = TestImage::create(&work.join("b.img"), B_SIZE)?;
    let (mut dev_a, sock_a) = DevBlk::start(&work, "a", &a.path, &[])?;
    let (mut dev_b, sock_b) = DevBlk::start(&work, "b", &b.path, &["--readonly"])?;

    let nonce = blk::nonce();
    let boot = L2Boot {
        name: "qemu-dev-blk".into(),
        vmm: Vmm::Qemu,
        cpus: 1,
        memory_mib: 512,
        cmdline: format!("{} panic=-1", blk::guest_cmdline(&["vda", "vdb"], &nonce)),
        initramfs: initramfs.clone(),
        timeout: QEMU_TIMEOUT,
    };
    let log = work.join(format!("{}.log", boot.name));
    let log_file = std::fs::File::create(&log)?;
    let memory = format!("{}M", boot.memory_mib);
    let chardev = |id: &str, sock: &Path| format!("socket,id={id},path={}", sock.display());
    let status = Command::new("timeout")
        .args(["-k", "10", &QEMU_TIMEOUT.as_secs().to_string()])
        .arg("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", &memory])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
        ])
        .args(["-numa", "node,memdev=mem"])
        .args(["-chardev", &chardev("c0", &sock_a)])
        .args(["-device", "vhost-user-blk-pci,chardev=c0"])
        .args(["-chardev", &chardev("c1", &sock_b)])
        .args(["-device", "vhost-user-blk-pci,chardev=c1"])
        .args(["-nographic", "-nic", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&testbed.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", &boot.cmdline])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context("running qemu-system-x86_64")?;
    let console = String::from_utf8_lossy(&std::fs::read(&log)?).into_owned();
    let outcome = L2Outcome {
        boot,
        status: status.code(),
        facts: l2::parse_facts(&console),
        console,
        log,
    };
    let mut dev_blk_ends = Vec::new();
    for dev in [&mut dev_a, &mut dev_b] {
        let status = dev.stop()?;
        dev_blk_ends.push((status, dev.log_text()));
    }
    Ok(QemuRun {
        outcome,
        a,
        b,
        nonce,
        dev_blk_ends,
    })
}

fn qemu_run() -> &'static QemuRun {
    static RUN: OnceLock<Result<QemuRun, String>> = OnceLock::new();
    RUN.get_or_init(|| {
        let _heavy = HEAVY.lock().unwrap_or_else(PoisonError::into_inner);
        run_qemu().map_err(|e| format!("{e:#}"))
    })
    .as_ref()
    .unwrap_or_else(|e| panic!("the QEMU run failed: {e}"))
}

/// The guest booted, loaded its modules, saw exactly `disks` and powered off.
fn assert_guest_ran(o: &L2Outcome, disks: &str) {
    let why = o.describe();
    assert!(
        !matches!(o.status, Some(TIMEOUT_STATUS | KILLED_STATUS)),
        "the guest ran out of time: {why}"
    );
    assert_eq!(o.fact("INIT"), Some("started"), "/init never ran: {why}");
    assert_eq!(o.fact("MODULES_FAILED"), Some(""), "insmod failed: {why}");
    assert_eq!(o.fact("DISKS"), Some(disks), "the guest's disks: {why}");
    assert_eq!(o.guest_end(), GuestEnd::PowerOff, "{why}");
}

/// The guest's md5 and size of `disk` are the image's as created.
fn assert_disk_matches(o: &L2Outcome, disk: &str, image: &TestImage) {
    let why = o.describe();
    assert_eq!(
        disk_fact(o, disk, "SIZE"),
        Some(sectors(image.original.len()).as_str()),
        "{disk}'s size in sectors, for {}: {why}",
        image.path.display()
    );
    assert_eq!(
        disk_fact(o, disk, "MD5"),
        Some(image.md5.as_str()),
        "the guest's md5 of {disk} is not the host's of {}: {why}",
        image.path.display()
    );
}

/// The guest's fsync'ed marker write to `disk` succeeded and is the only change in the image.
fn assert_write_landed(o: &L2Outcome, disk: &str, image: &TestImage, nonce: &str) {
    let why = o.describe();
    let marker = blk::marker(disk, nonce);
    assert_eq!(
        disk_fact(o, disk, "RO"),
        Some("0"),
        "{disk} read-only: {why}"
    );
    assert_eq!(disk_fact(o, disk, "WRITE"), Some("ok"), "{why}");
    assert_eq!(
        disk_fact(o, disk, "READBACK"),
        Some(marker.as_str()),
        "the guest did not read its write back from {disk}: {why}"
    );
    if let Err(how) = image.check_written(marker.as_bytes(), MARKER_OFFSET) {
        panic!(
            "after the guest wrote {marker:?} at byte {MARKER_OFFSET} of {disk} with fsync, \
             the image is not the original plus that write: {how}\n{why}"
        );
    }
}

/// `disk` is read-only in the guest, its write failed there, and the image is unchanged.
fn assert_write_refused(o: &L2Outcome, disk: &str, image: &TestImage) {
    let why = o.describe();
    assert_eq!(
        disk_fact(o, disk, "RO"),
        Some("1"),
        "{disk} read-only: {why}"
    );
    assert!(
        disk_fact(o, disk, "WRITE").is_some_and(|w| w.starts_with("failed")),
        "writing the read-only {disk} did not fail in the guest: {why}"
    );
    assert!(
        disk_fact(o, disk, "READBACK").is_some_and(|r| r.starts_with("other bytes: ")),
        "the guest reads its refused write back from {disk}: {why}"
    );
    if let Err(how) = image.check_unchanged() {
        panic!("the read-only image changed: {how}\n{why}");
    }
}

#[test]
fn qemu_guest_reads_dev_blk_disks_with_the_images_md5s() {
    let run = qemu_run();
    assert_guest_ran(&run.outcome, "vda vdb");
    assert_disk_matches(&run.outcome, "vda", &run.a);
    assert_disk_matches(&run.outcome, "vdb", &run.b);
}

#[test]
fn qemu_guest_write_with_fsync_lands_in_the_dev_blk_image() {
    let run = qemu_run();
    assert_guest_ran(&run.outcome, "vda vdb");
    assert_write_landed(&run.outcome, "vda", &run.a, &run.nonce);
}

#[test]
fn qemu_guest_cannot_write_a_readonly_dev_blk_disk() {
    let run = qemu_run();
    assert_guest_ran(&run.outcome, "vda vdb");
    assert_write_refused(&run.outcome, "vdb", &run.b);
}

#[test]
fn dev_blk_exits_0_on_sigterm_after_serving_qemu() {
    for (status, log) in &qemu_run().dev_blk_ends {
        assert!(status.success(), "dev-blk ended with {status}; {log}");
    }
}

// ---------------------------------------------------------------------------------------------
// atoll in L1.
// ---------------------------------------------------------------------------------------------

struct L1Session {
    two_disks: L2Outcome,
    external: L2Outcome,
    a: TestImage,
    b: TestImage,
    /// Exported by qemu-storage-daemon.
    q: TestImage,
    /// Served by dev-blk with two queues.
    m: TestImage,
    nonce: String,
    qsd_status: String,
    qsd_log: String,
}

fn run_l1() -> Result<L1Session> {
    let atoll = paths::require_release_bin("atoll")?;
    paths::require_release_bin("vmm-core")?;
    paths::require_release_bin("dev-blk")?;
    TimedCommand::new("qemu-storage-daemon", Duration::from_secs(30))
        .arg("--version")
        .output_ok()
        .context("qemu-storage-daemon is needed (apt-get install -y qemu-system-x86)")?;
    let testbed = Testbed::setup()?;
    let work = testbed.work_dir("blk-l1")?;
    let initramfs = work.join("blk.cpio");
    testbed.write_l2_initramfs(&initramfs, GUEST_MODULES, &blk::guest_init())?;
    // On the work share: L1 sees them at the same paths, and they are this machine's files.
    let a = TestImage::create(&work.join("a.img"), A_SIZE)?;
    let b = TestImage::create(&work.join("b.img"), B_SIZE)?;
    let q = TestImage::create(&work.join("q.img"), A_SIZE)?;
    let m = TestImage::create(&work.join("m.img"), B_SIZE)?;
    let nonce = blk::nonce();
    let boot = |name: &str| L2Boot {
        name: name.into(),
        vmm: Vmm::Atoll,
        cpus: 2,
        memory_mib: 512,
        cmdline: blk::guest_cmdline(&["vda", "vdb"], &nonce),
        initramfs: initramfs.clone(),
        timeout: BOOT_TIMEOUT,
    };
    // A UNIX socket cannot live on the 9p share; L1's /tmp is its own tmpfs.
    let socket = PathBuf::from(format!("/tmp/atoll-blk-{}.sock", std::process::id()));
    let boots = [
        // The command line.
        AtollDiskBoot {
            boot: boot("two-disks"),
            disks: vec![
                format!("path={}", a.path.display()),
                format!("path={},readonly=on", b.path.display()),
            ],
            qsd: None,
        },
        AtollDiskBoot {
            boot: boot("qsd-and-mq"),
            disks: vec![
                format!("socket={}", socket.display()),
                format!("path={},queues=2", m.path.display()),
            ],
            qsd: Some(QsdExport {
                image: q.path.clone(),
                socket,
            }),
        },
    ];
    let out = work.join("l2");
    let script = blk::boots_script(&boots, &[&a, &b, &q, &m], &testbed.kernel, &atoll, &out);
    let timeout = boots
        .iter()
        .map(|b| b.boot.timeout + Duration::from_secs(45))
        .sum::<Duration>()
        + Duration::from_secs(120);
    let run = testbed.run_script(&work, &script, timeout, false)?;
    ensure!(
        run.status == 0,
        "the boot script failed with status {}; see {}",
        run.status,
        run.log.display()
    );
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("<{}: {e}>", path.display()))
    };
    let external = &boots[1];
    Ok(L1Session {
        two_disks: boots[0].outcome(&out),
        external: external.outcome(&out),
        qsd_status: read(blk::qsd_status(&out, &external.boot.name)),
        qsd_log: read(blk::qsd_log(&out, &external.boot.name)),
        a,
        b,
        q,
        m,
        nonce,
    })
}

fn l1_session() -> &'static L1Session {
    static SESSION: OnceLock<Result<L1Session, String>> = OnceLock::new();
    SESSION
        .get_or_init(|| {
            let _heavy = HEAVY.lock().unwrap_or_else(PoisonError::into_inner);
            run_l1().map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .unwrap_or_else(|e| panic!("the L1 session failed: {e}"))
}

/// The boot with qemu-storage-daemon: it ran and exited 0 on SIGTERM.
fn external_boot() -> &'static L1Session {
    let s = l1_session();
    assert_eq!(
        s.qsd_status,
        "exit 0",
        "qemu-storage-daemon did not run and exit cleanly; its output:\n{}\n{}",
        s.qsd_log,
        s.external.describe()
    );
    assert_guest_ran(&s.external, "vda vdb");
    s
}

#[test]
fn atoll_guest_sees_vda_and_vdb_with_the_images_md5s() {
    let s = l1_session();
    assert_guest_ran(&s.two_disks, "vda vdb");
    assert_disk_matches(&s.two_disks, "vda", &s.a);
    assert_disk_matches(&s.two_disks, "vdb", &s.b);
    assert_eq!(
        s.two_disks.fact("VDA_QUEUES"),
        Some("1"),
        "one queue by default: {}",
        s.two_disks.describe()
    );
}

#[test]
fn atoll_guest_write_with_fsync_lands_in_the_image_on_the_host() {
    let s = l1_session();
    assert_guest_ran(&s.two_disks, "vda vdb");
    assert_write_landed(&s.two_disks, "vda", &s.a, &s.nonce);
}

#[test]
fn atoll_readonly_disk_refuses_writes_and_its_image_is_unchanged() {
    let s = l1_session();
    assert_guest_ran(&s.two_disks, "vda vdb");
    assert_write_refused(&s.two_disks, "vdb", &s.b);
}

#[test]
fn atoll_drives_a_qemu_storage_daemon_export() {
    let s = external_boot();
    assert_disk_matches(&s.external, "vda", &s.q);
    assert_write_landed(&s.external, "vda", &s.q, &s.nonce);
}

#[test]
fn atoll_multiqueue_disk_has_two_hardware_queues() {
    let s = external_boot();
    let o = &s.external;
    assert_eq!(
        o.fact("VDB_QUEUES"),
        Some("2"),
        "/sys/block/vdb/mq of a queues=2 disk: {}",
        o.describe()
    );
    assert_disk_matches(o, "vdb", &s.m);
    assert_write_landed(o, "vdb", &s.m, &s.nonce);
}
