//! A device process killed again and again under guest I/O (issue: least privilege and
//! supervision): in L1, a stock Debian guest writes random chunks to its disk with fsync and
//! reads each back uncached, in a loop, while `dev-blk` is SIGKILLed 20 times at random
//! moments. The launcher restarts it each time, the core reconnects and resumes the rings from
//! the guest's `used.idx`: the guest sees no I/O error, every chunk verifies, and the VM runs
//! on to its normal power-off. Needs `cargo build --release` first.

use std::path::PathBuf;
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

fn release_bin(name: &str) -> Result<PathBuf> {
    let path = paths::release_bin(name);
    ensure!(
        path.is_file(),
        "{} does not exist: these tests run after `cargo build --release --workspace`",
        path.display()
    );
    Ok(path)
}

/// What one kill session left: the guest's facts, the kills (old and new pid per line), and
/// for the network session L1's ping results.
struct KillSession {
    guest: L2Outcome,
    kills: String,
    flood: String,
    ping_after_rc: String,
}

fn run_l1() -> Result<(L2Outcome, String)> {
    let atoll = release_bin("atoll")?;
    release_bin("vmm-core")?;
    release_bin("dev-blk")?;
    let testbed = Testbed::setup()?;
    let work = testbed.work_dir("restart-l1")?;
    let initramfs = work.join("restart.cpio");
    testbed.write_l2_initramfs(&initramfs, GUEST_MODULES, &restart::guest_init())?;
    let boot = L2Boot {
        name: "blk-kills".into(),
        vmm: Vmm::Atoll,
        cpus: 1,
        memory_mib: 256,
        cmdline: restart::guest_cmdline(LOOP_SECS),
        initramfs,
        timeout: BOOT_TIMEOUT,
    };
    let out = work.join("l2");
    let script = restart::l1_script(&boot, KILLS, &testbed.kernel, &atoll, &out);
    let run = testbed.run_script(
        &work,
        &script,
        BOOT_TIMEOUT + Duration::from_secs(120),
        false,
    )?;
    ensure!(
        run.status == 0,
        "the L1 script failed with status {}; see {}",
        run.status,
        run.log.display()
    );
    let kills = std::fs::read_to_string(out.join("kills")).unwrap_or_default();
    Ok((L2Outcome::read(&boot, &out), kills))
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
    let (o, kills) = run_l1().unwrap_or_else(|e| panic!("the L1 session failed: {e:#}"));
    let why = o.describe();
    assert_all_kills_restarted(&kills, &why);
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

fn run_net_l1() -> Result<KillSession> {
    let atoll = release_bin("atoll")?;
    release_bin("vmm-core")?;
    release_bin("dev-net")?;
    let testbed = Testbed::setup()?;
    let work = testbed.work_dir("restart-net-l1")?;
    let initramfs = work.join("restart-net.cpio");
    testbed.write_l2_initramfs(&initramfs, NET_GUEST_MODULES, &restart::net_guest_init())?;
    let boot = L2Boot {
        name: "net-kills".into(),
        vmm: Vmm::Atoll,
        cpus: 1,
        memory_mib: 256,
        cmdline: restart::guest_cmdline(LOOP_SECS),
        initramfs,
        timeout: BOOT_TIMEOUT,
    };
    let out = work.join("l2");
    let script = restart::net_l1_script(&boot, KILLS, &testbed.kernel, &atoll, &out);
    let run = testbed.run_script(
        &work,
        &script,
        BOOT_TIMEOUT + Duration::from_secs(120),
        false,
    )?;
    ensure!(
        run.status == 0,
        "the L1 script failed with status {}; see {}",
        run.status,
        run.log.display()
    );
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    Ok(KillSession {
        guest: L2Outcome::read(&boot, &out),
        kills: read("kills"),
        flood: read("flood.log"),
        ping_after_rc: read("ping-after.rc").trim().to_owned(),
    })
}

#[test]
fn dev_net_killed_20_times_under_a_ping_flood_and_transfers_recovers() {
    let s = run_net_l1().unwrap_or_else(|e| panic!("the L1 session failed: {e:#}"));
    let why = s.guest.describe();
    assert_all_kills_restarted(&s.kills, &why);
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
        s.flood.contains("packets received") && !s.flood.contains(" 0 packets received"),
        "the ping flood got no replies: {}",
        s.flood
    );
    assert_eq!(
        s.ping_after_rc, "0",
        "the link must come back after the kills: {why}"
    );
    assert_eq!(s.guest.guest_end(), GuestEnd::PowerOff, "{why}");
}

/// Past its restart budget a device is failed, and the guest gets I/O errors, not a hang: L1
/// kills every new dev-blk at once until the launcher stops restarting it.
#[test]
fn a_device_past_its_restart_budget_fails_with_io_errors_not_a_hang() {
    let run = || -> Result<(L2Outcome, String, String)> {
        let atoll = release_bin("atoll")?;
        release_bin("vmm-core")?;
        release_bin("dev-blk")?;
        let testbed = Testbed::setup()?;
        let work = testbed.work_dir("restart-fail-l1")?;
        let initramfs = work.join("restart-fail.cpio");
        testbed.write_l2_initramfs(&initramfs, GUEST_MODULES, &restart::fail_guest_init())?;
        let boot = L2Boot {
            name: "blk-fails".into(),
            vmm: Vmm::Atoll,
            cpus: 1,
            memory_mib: 256,
            cmdline: restart::guest_cmdline(LOOP_SECS),
            initramfs,
            timeout: BOOT_TIMEOUT,
        };
        let out = work.join("l2");
        let script = restart::fail_l1_script(&boot, 60, &testbed.kernel, &atoll, &out);
        let run = testbed.run_script(
            &work,
            &script,
            BOOT_TIMEOUT + Duration::from_secs(120),
            false,
        )?;
        ensure!(
            run.status == 0,
            "the L1 script failed with status {}; see {}",
            run.status,
            run.log.display()
        );
        let kills = std::fs::read_to_string(out.join("kills")).unwrap_or_default();
        let log = std::fs::read_to_string(out.join("blk-fails.log")).unwrap_or_default();
        Ok((L2Outcome::read(&boot, &out), kills, log))
    };
    let (o, kills, log) = run().unwrap_or_else(|e| panic!("the L1 session failed: {e:#}"));
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
