//! A device process killed again and again under guest I/O (issue: least privilege and
//! supervision): in L1, a stock Debian guest writes random chunks to its disk with fsync and
//! reads each back uncached, in a loop, while `dev-blk` is SIGKILLed 20 times at random
//! moments. The launcher restarts it each time, the core reconnects and resumes the rings from
//! the guest's `used.idx`: the guest sees no I/O error, every chunk verifies, and the VM runs
//! on to its normal power-off. The same for `dev-net` under a ping flood and repeated
//! transfers; and a device killed past its restart budget is failed: the guest gets I/O
//! errors, not a hang. Needs `cargo build --release` first.

use std::time::Duration;

use anyhow::{Result, ensure};
use atoll_tests::Testbed;
use atoll_tests::l2::{GuestEnd, L2Boot, L2Outcome, Vmm};
use atoll_tests::paths;
use atoll_tests::restart::{self, GUEST_MODULES, NET_GUEST_MODULES};

const KILLS: u32 = 20;
/// The longest the guest's write/verify loop runs; L1 normally stops it after its kills.
const LOOP_SECS: u32 = 240;
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

/// What one session left: the guest's facts and L1's files in the output directory.
struct Session {
    guest: L2Outcome,
    out: std::path::PathBuf,
}

impl Session {
    /// An L1 file of the session (empty when it is missing).
    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.out.join(name))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }
}

/// The L1 side of a scenario: `(boot, kernel, atoll, out) -> script`.
type L1Script =
    fn(&L2Boot, &atoll_tests::kernel::Kernel, &std::path::Path, &std::path::Path) -> String;

/// Boots the guest `init` (with `modules`) in L1 under `script`, and returns what it left.
fn run_session(
    name: &str,
    device: &str,
    modules: &[&str],
    init: &str,
    script: L1Script,
) -> Session {
    let run = || -> Result<Session> {
        let atoll = paths::require_release_bin("atoll")?;
        paths::require_release_bin("vmm-core")?;
        paths::require_release_bin(device)?;
        let testbed = Testbed::setup()?;
        let work = testbed.work_dir(&format!("restart-{name}-l1"))?;
        let initramfs = work.join(format!("{name}.cpio"));
        testbed.write_l2_initramfs(&initramfs, modules, init)?;
        let boot = L2Boot {
            name: name.into(),
            vmm: Vmm::Atoll,
            cpus: 1,
            memory_mib: 256,
            cmdline: restart::guest_cmdline(LOOP_SECS),
            initramfs,
            timeout: BOOT_TIMEOUT,
        };
        let out = work.join("l2");
        let text = script(&boot, &testbed.kernel, &atoll, &out);
        let run =
            testbed.run_script(&work, &text, BOOT_TIMEOUT + Duration::from_secs(120), false)?;
        ensure!(
            run.status == 0,
            "the L1 script failed with status {}; see {}",
            run.status,
            run.log.display()
        );
        Ok(Session {
            guest: L2Outcome::read(&boot, &out),
            out,
        })
    };
    run().unwrap_or_else(|e| panic!("the L1 session failed: {e:#}"))
}

/// Every kill was followed by a new process.
fn assert_all_kills_restarted(kills: &str, why: &str) {
    let done: Vec<&str> = kills.lines().collect();
    assert_eq!(
        done.len(),
        usize::try_from(KILLS).unwrap(),
        "kills done (old pid, new pid):\n{kills}\n{why}"
    );
    for line in &done {
        let pids: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            pids.len(),
            2,
            "the device was not restarted after a kill: {line:?}\n{why}"
        );
    }
}

#[test]
fn dev_blk_killed_20_times_under_io_loses_nothing() {
    let s = run_session(
        "blk-kills",
        "dev-blk",
        GUEST_MODULES,
        &restart::guest_init(),
        |b, k, a, o| restart::l1_script(b, KILLS, k, a, o),
    );
    let o = &s.guest;
    let why = o.describe();
    assert_all_kills_restarted(&s.file("kills"), &why);
    assert_eq!(o.fact("MODULES_FAILED"), Some(""), "{why}");
    let rounds: u32 = o
        .fact("ROUNDS")
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("the guest's loop did not finish: {why}"));
    assert!(rounds >= 10, "only {rounds} write/verify rounds ran: {why}");
    assert_eq!(
        o.fact("STOPPED_BY_L1"),
        Some("yes"),
        "the loop must run through all kills: {why}"
    );
    assert_eq!(
        o.fact("BAD_ROUNDS"),
        Some("0"),
        "first failure: {:?}\n{why}",
        o.fact("FIRST_BAD")
    );
    assert_eq!(
        o.fact("IO_ERRORS"),
        Some("0"),
        "I/O errors in the guest: {why}"
    );
    assert_eq!(
        o.guest_end(),
        GuestEnd::PowerOff,
        "the VM must run on: {why}"
    );
}

#[test]
fn dev_net_killed_20_times_under_a_ping_flood_and_transfers_recovers() {
    let s = run_session(
        "net-kills",
        "dev-net",
        NET_GUEST_MODULES,
        &restart::net_guest_init(),
        |b, k, a, o| restart::net_l1_script(b, KILLS, k, a, o),
    );
    let why = s.guest.describe();
    assert_all_kills_restarted(&s.file("kills"), &why);
    let flood = s.file("flood.log");
    assert_eq!(s.guest.fact("MODULES_FAILED"), Some(""), "{why}");
    let rounds: u32 = s
        .guest
        .fact("ROUNDS")
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("the guest's transfer loop did not finish: {why}"));
    assert!(rounds >= 2, "only {rounds} transfers ran: {why}");
    assert_eq!(s.guest.fact("STOPPED_BY_L1"), Some("yes"), "{why}");
    assert_eq!(
        s.guest.fact("BAD_ROUNDS"),
        Some("0"),
        "a transfer arrived corrupted: {:?}\n{why}",
        s.guest.fact("FIRST_BAD")
    );
    assert_eq!(
        s.guest.fact("WGET_FAILED"),
        Some("0"),
        "a transfer failed: {:?}\n{why}",
        s.guest.fact("FIRST_BAD")
    );
    assert!(
        flood.contains("packets received") && !flood.contains(" 0 packets received"),
        "the ping flood got no replies: {flood}"
    );
    assert_eq!(
        s.file("ping-after.rc"),
        "0",
        "the link must come back after the kills: {why}"
    );
    assert_eq!(s.guest.guest_end(), GuestEnd::PowerOff, "{why}");
}

/// Past its restart budget a device is failed, and the guest gets I/O errors, not a hang: L1
/// kills every new dev-blk at once until the launcher stops restarting it.
#[test]
fn a_device_past_its_restart_budget_fails_with_io_errors_not_a_hang() {
    let s = run_session(
        "blk-fails",
        "dev-blk",
        GUEST_MODULES,
        &restart::fail_guest_init(),
        |b, k, a, o| restart::fail_l1_script(b, 60, k, a, o),
    );
    let o = &s.guest;
    let log = s.file("blk-fails.log");
    let kills = s.file("kills");
    let why = o.describe();
    let kills: u32 = kills.trim().parse().unwrap_or(0);
    // The budget is 30 restarts: the 31st death is the last.
    assert_eq!(kills, 31, "deaths until the launcher gave up: {why}");
    assert!(
        log.contains("used up its restart budget"),
        "the launcher did not mark the device failed: {why}"
    );
    assert!(
        o.fact("DD_ERROR").is_some_and(|e| !e.is_empty()),
        "the guest's writes never failed: {why}"
    );
    assert_eq!(
        o.guest_end(),
        GuestEnd::PowerOff,
        "the VM must run on: {why}"
    );
}
