//! Network cards end to end in the testbed: in one L1 session, atoll boots a stock Debian
//! kernel with two cards, the issue's `--net tap=tap0,mac=52:54:00:12:34:56` and a second one
//! with two queue pairs on a multi-queue tap (`--net tap=tap1,queues=2`), each served by its
//! own dev-net. Over each card the guest pings L1 and L1 pings the guest, and a 4 MiB file
//! goes each way with its md5 compared at both ends. Needs `cargo build --release` first.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Result, ensure};
use atoll_tests::Testbed;
use atoll_tests::l2::{GuestEnd, L2Boot, L2Outcome, Vmm};
use atoll_tests::net::{self, Card, GUEST_MODULES};
use atoll_tests::paths;

/// An L2 boot in L1 takes 10-20 s on an idle 2-core host, over a minute on a busy one; the
/// transfers add a little.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the guest waits for L1 to finish its side.
const GUEST_WAIT_SECS: u64 = 200;
const MAC0: &str = "52:54:00:12:34:56";

fn cards() -> Vec<Card> {
    vec![
        Card {
            tap: "tap0".into(),
            multi_queue: false,
            net: format!("tap=tap0,mac={MAC0}"),
            mac: Some(MAC0.into()),
            subnet: "10.0.0".into(),
        },
        Card {
            tap: "tap1".into(),
            multi_queue: true,
            net: "tap=tap1,queues=2".into(),
            mac: None,
            subnet: "10.0.1".into(),
        },
    ]
}

/// What the session left: the guest's facts and L1's side of each card.
struct Session {
    guest: L2Outcome,
    h2g_md5: String,
    /// Per card: L1's ping exit status and output, and the md5 of what it fetched.
    ping_rc: Vec<String>,
    ping_log: Vec<String>,
    g2h_md5: Vec<String>,
}

fn run_l1() -> Result<Session> {
    let atoll = paths::require_release_bin("atoll")?;
    paths::require_release_bin("vmm-core")?;
    paths::require_release_bin("dev-net")?;
    let testbed = Testbed::setup()?;
    let work = testbed.work_dir("net-l1")?;
    let initramfs = work.join("net.cpio");
    testbed.write_l2_initramfs(&initramfs, GUEST_MODULES, &net::guest_init())?;
    let cards = cards();
    let boot = L2Boot {
        name: "two-nics".into(),
        vmm: Vmm::Atoll,
        cpus: 2,
        memory_mib: 384,
        cmdline: net::guest_cmdline(&cards, GUEST_WAIT_SECS),
        initramfs,
        timeout: BOOT_TIMEOUT,
    };
    let out = work.join("l2");
    let script = net::l1_script(&boot, &cards, &testbed.kernel, &atoll, &out);
    let run = testbed.run_script(
        &work,
        &script,
        BOOT_TIMEOUT + Duration::from_secs(180),
        false,
    )?;
    ensure!(
        run.status == 0,
        "the L1 script failed with status {}; see {}",
        run.status,
        run.log.display()
    );
    let read = |name: String| {
        let path = out.join(&name);
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("<{}: {e}>", path.display()))
    };
    Ok(Session {
        guest: L2Outcome::read(&boot, &out),
        h2g_md5: read("h2g.md5".into()),
        ping_rc: (0..cards.len())
            .map(|n| read(format!("ping{n}.rc")))
            .collect(),
        ping_log: (0..cards.len())
            .map(|n| read(format!("ping{n}.log")))
            .collect(),
        g2h_md5: (0..cards.len())
            .map(|n| read(format!("g2h{n}.md5")))
            .collect(),
    })
}

fn session() -> &'static Session {
    static SESSION: OnceLock<Result<Session, String>> = OnceLock::new();
    SESSION
        .get_or_init(|| run_l1().map_err(|e| format!("{e:#}")))
        .as_ref()
        .unwrap_or_else(|e| panic!("the L1 session failed: {e}"))
}

fn nic<'a>(s: &'a Session, n: usize, key: &str) -> Option<&'a str> {
    s.guest.fact(&format!("NIC{n}_{key}"))
}

#[test]
fn guest_ran_and_powered_off_after_l1_finished() {
    let s = session();
    let why = s.guest.describe();
    assert_eq!(
        s.guest.fact("MODULES_FAILED"),
        Some(""),
        "insmod failed: {why}"
    );
    assert_eq!(
        s.guest.fact("L1_DONE"),
        Some("ok"),
        "the guest never saw L1 finish: {why}"
    );
    assert_eq!(s.guest.guest_end(), GuestEnd::PowerOff, "{why}");
}

#[test]
fn eth0_has_the_configured_mac_and_link_up() {
    let s = session();
    let why = s.guest.describe();
    assert_eq!(nic(s, 0, "IF"), Some("eth0"), "{why}");
    assert_eq!(nic(s, 0, "MAC"), Some(MAC0), "{why}");
    assert_eq!(nic(s, 0, "DRIVER"), Some("virtio_net"), "{why}");
    assert_eq!(nic(s, 0, "CARRIER"), Some("1"), "{why}");
    assert_eq!(nic(s, 0, "MTU"), Some("1500"), "the tap's MTU: {why}");
    assert_eq!(nic(s, 0, "RXQ"), Some("1"), "{why}");
}

#[test]
fn second_card_has_a_stable_local_mac_and_two_queue_pairs() {
    let s = session();
    let why = s.guest.describe();
    assert_eq!(nic(s, 1, "IF"), Some("eth1"), "{why}");
    let mac = nic(s, 1, "MAC").unwrap_or_default();
    let first = u8::from_str_radix(mac.get(..2).unwrap_or("zz"), 16)
        .unwrap_or_else(|_| panic!("no MAC for eth1: {why}"));
    assert_eq!(first & 3, 2, "locally administered unicast: {mac}");
    assert_eq!(nic(s, 1, "CARRIER"), Some("1"), "{why}");
    assert_eq!(nic(s, 1, "RXQ"), Some("2"), "{why}");
    assert_eq!(nic(s, 1, "TXQ"), Some("2"), "{why}");
}

#[test]
fn ping_works_both_ways_on_both_cards() {
    let s = session();
    let why = s.guest.describe();
    for n in 0..2 {
        assert_eq!(
            nic(s, n, "PING"),
            Some("ok"),
            "guest -> L1 on card {n}: {why}"
        );
        assert_eq!(
            s.ping_rc[n], "0",
            "L1 -> guest on card {n}: {}\n{why}",
            s.ping_log[n]
        );
    }
}

#[test]
fn four_mib_each_way_with_matching_md5s_on_both_cards() {
    let s = session();
    let why = s.guest.describe();
    assert_eq!(s.h2g_md5.len(), 32, "L1's digest: {}", s.h2g_md5);
    let g2h = s.guest.fact("G2H_MD5").unwrap_or_default();
    assert_eq!(g2h.len(), 32, "the guest's digest: {why}");
    for n in 0..2 {
        assert_eq!(
            nic(s, n, "H2G_MD5"),
            Some(s.h2g_md5.as_str()),
            "L1 -> guest over card {n}: {why}"
        );
        assert_eq!(s.g2h_md5[n], g2h, "guest -> L1 over card {n}: {why}");
    }
}
