//! Whole-VM boots of a stock Debian kernel with a busybox `/init` that prints facts, under
//! atoll and under Debian's QEMU as the differential reference, all in one L1 session
//! (TESTBED.md). Needs `cargo build --release` first: atoll is `target/release/atoll`.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Result;
use atoll_tests::Testbed;
use atoll_tests::l2::{GuestEnd, L2Boot, L2Outcome, Vmm};
use atoll_tests::paths;

/// One guest configuration, booted under each VMM.
struct Scenario {
    name: &'static str,
    cpus: u32,
    memory_mib: u32,
    /// Appended to `console=ttyS0`.
    cmdline: &'static str,
}

const ONE_VCPU: Scenario = Scenario {
    name: "one-vcpu",
    cpus: 1,
    memory_mib: 512,
    cmdline: "testbed.action=poweroff",
};
const TWO_VCPUS: Scenario = Scenario {
    name: "two-vcpus",
    cpus: 2,
    memory_mib: 768,
    cmdline: "testbed.action=poweroff",
};
const REBOOT: Scenario = Scenario {
    name: "reboot",
    cpus: 1,
    memory_mib: 512,
    cmdline: "testbed.action=reboot",
};
const PANIC: Scenario = Scenario {
    name: "panic",
    cpus: 1,
    memory_mib: 512,
    cmdline: "testbed.action=panic",
};
const PANIC_THEN_REBOOT: Scenario = Scenario {
    name: "panic-reboot",
    cpus: 1,
    memory_mib: 512,
    cmdline: "testbed.action=panic panic=-1",
};
const SCENARIOS: [&Scenario; 5] = [&ONE_VCPU, &TWO_VCPUS, &REBOOT, &PANIC, &PANIC_THEN_REBOOT];

/// Generous: a TCG-nested L2 boot takes 10-20 s on an idle 2-core host, over a minute on a
/// busy one.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

struct Session {
    release: String,
    outcomes: BTreeMap<(Vmm, &'static str), L2Outcome>,
    /// Why the atoll boots did not run.
    atoll_missing: Option<String>,
}

fn run_session() -> Result<Session> {
    let testbed = Testbed::setup()?;
    let work = testbed.work_dir("boot-tests")?;
    let initramfs = testbed.facts_initramfs(&work)?;
    let atoll = paths::release_bin("atoll");
    let atoll_missing = if std::env::var_os("ATOLL_TESTBED_QEMU_ONLY").is_some() {
        Some("the atoll boots did not run: ATOLL_TESTBED_QEMU_ONLY is set".to_owned())
    } else if !atoll.is_file() {
        Some(format!(
            "{} does not exist: the whole-VM tests run after `cargo build --release` \
             (scripts/test.sh does both)",
            atoll.display()
        ))
    } else {
        None
    };
    // The reference first: its results stay meaningful even when atoll boots hang.
    let vmms: &[Vmm] = if atoll_missing.is_some() {
        &[Vmm::Qemu]
    } else {
        &[Vmm::Qemu, Vmm::Atoll]
    };
    let mut boots = Vec::new();
    for &vmm in vmms {
        for scenario in SCENARIOS {
            boots.push(L2Boot {
                name: format!("{}-{}", vmm.name(), scenario.name),
                vmm,
                cpus: scenario.cpus,
                memory_mib: scenario.memory_mib,
                cmdline: format!("console=ttyS0 {}", scenario.cmdline),
                initramfs: initramfs.clone(),
                timeout: BOOT_TIMEOUT,
            });
        }
    }
    let outcomes = testbed.run_l2_boots(&work, &boots)?;
    let mut by_scenario = BTreeMap::new();
    for outcome in outcomes {
        let scenario = SCENARIOS
            .iter()
            .find(|s| outcome.boot.name == format!("{}-{}", outcome.boot.vmm.name(), s.name))
            .expect("every boot comes from a scenario");
        by_scenario.insert((outcome.boot.vmm, scenario.name), outcome);
    }
    Ok(Session {
        release: testbed.kernel.release.clone(),
        outcomes: by_scenario,
        atoll_missing,
    })
}

fn session() -> &'static Session {
    static SESSION: OnceLock<Result<Session, String>> = OnceLock::new();
    SESSION
        .get_or_init(|| run_session().map_err(|e| format!("{e:#}")))
        .as_ref()
        .unwrap_or_else(|e| panic!("the testbed session failed: {e}"))
}

fn outcome(vmm: Vmm, scenario: &Scenario) -> &'static L2Outcome {
    let session = session();
    if vmm == Vmm::Atoll
        && let Some(why) = &session.atoll_missing
    {
        panic!("{why}");
    }
    &session.outcomes[&(vmm, scenario.name)]
}

/// The guest reached its `/init` and saw the configured vCPUs and memory.
fn assert_booted(o: &L2Outcome, scenario: &Scenario) {
    let why = o.describe();
    assert_eq!(o.fact("INIT"), Some("started"), "/init never ran: {why}");
    assert_eq!(o.fact("MODULES_FAILED"), Some(""), "insmod failed: {why}");
    assert_eq!(
        o.fact("UNAME_R"),
        Some(session().release.as_str()),
        "wrong kernel: {why}"
    );
    let online = if scenario.cpus == 1 {
        "0".to_owned()
    } else {
        format!("0-{}", scenario.cpus - 1)
    };
    assert_eq!(
        o.fact("CPUS_ONLINE"),
        Some(online.as_str()),
        "online CPUs: {why}"
    );
    assert_eq!(
        o.fact("NPROC"),
        Some(scenario.cpus.to_string().as_str()),
        "nproc: {why}"
    );
    let memtotal_kib: u64 = o
        .fact("MEMTOTAL_KB")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal fact: {why}"));
    let configured_kib = u64::from(scenario.memory_mib) * 1024;
    // MemTotal is RAM minus what firmware and the kernel image keep: 85%-100% for these sizes.
    assert!(
        memtotal_kib * 100 >= configured_kib * 85 && memtotal_kib <= configured_kib,
        "MemTotal {memtotal_kib} KiB is not 85%-100% of the configured {configured_kib} KiB: {why}"
    );
    assert!(
        o.fact("CMDLINE")
            .is_some_and(|c| c.contains(scenario.cmdline)),
        "the guest did not get the command line {:?}: {why}",
        scenario.cmdline
    );
}

fn assert_ended(o: &L2Outcome, expected: &GuestEnd) {
    assert_eq!(&o.guest_end(), expected, "{}", o.describe());
    let words = match expected {
        GuestEnd::PowerOff => "reboot: Power down",
        GuestEnd::Reboot => "reboot: Restarting system",
        _ => "Kernel panic - not syncing: sysrq triggered crash",
    };
    assert!(
        o.console.contains(words),
        "the console lacks {words:?}: {}",
        o.describe()
    );
}

/// The guest found the ACPI pvpanic device (`QEMU0001`) and bound its driver, so a panic
/// reaches the VMM.
fn assert_pvpanic_bound(o: &L2Outcome) {
    assert!(
        o.fact("PVPANIC").is_some_and(|p| p.contains("QEMU0001")),
        "pvpanic-mmio did not bind to an ACPI QEMU0001 device: {}",
        o.describe()
    );
}

fn check(vmm: Vmm, scenario: &Scenario, end: &GuestEnd) {
    let o = outcome(vmm, scenario);
    assert_booted(o, scenario);
    assert_ended(o, end);
    if *end == GuestEnd::Crash {
        assert_pvpanic_bound(o);
    }
}

// The reference: these validate the harness itself.

#[test]
fn qemu_one_vcpu_boots_and_powers_off() {
    check(Vmm::Qemu, &ONE_VCPU, &GuestEnd::PowerOff);
}

#[test]
fn qemu_two_vcpus_are_online() {
    check(Vmm::Qemu, &TWO_VCPUS, &GuestEnd::PowerOff);
}

#[test]
fn qemu_reports_reboot() {
    check(Vmm::Qemu, &REBOOT, &GuestEnd::Reboot);
}

#[test]
fn qemu_reports_panic_through_pvpanic() {
    check(Vmm::Qemu, &PANIC, &GuestEnd::Crash);
}

#[test]
fn qemu_reports_panic_through_pvpanic_before_panic_reboot() {
    check(Vmm::Qemu, &PANIC_THEN_REBOOT, &GuestEnd::Crash);
}

// atoll: exit 0 = powered off, 3 = rebooted, 4 = crashed.

#[test]
fn atoll_one_vcpu_boots_and_powers_off_with_status_0() {
    check(Vmm::Atoll, &ONE_VCPU, &GuestEnd::PowerOff);
}

#[test]
fn atoll_two_vcpus_are_online() {
    check(Vmm::Atoll, &TWO_VCPUS, &GuestEnd::PowerOff);
}

#[test]
fn atoll_reports_reboot_with_status_3() {
    check(Vmm::Atoll, &REBOOT, &GuestEnd::Reboot);
}

#[test]
fn atoll_reports_panic_with_status_4() {
    check(Vmm::Atoll, &PANIC, &GuestEnd::Crash);
}

#[test]
fn atoll_reports_panic_with_status_4_despite_panic_reboot() {
    check(Vmm::Atoll, &PANIC_THEN_REBOOT, &GuestEnd::Crash);
}

/// The same guest reports the same facts under atoll as under QEMU.
#[test]
fn atoll_matches_qemu_reference() {
    let mut differences = Vec::new();
    for scenario in SCENARIOS {
        let (q, a) = (outcome(Vmm::Qemu, scenario), outcome(Vmm::Atoll, scenario));
        for key in [
            "INIT",
            "MODULES_FAILED",
            "UNAME_R",
            "CPUS_ONLINE",
            "NPROC",
            "PVPANIC",
            "CMDLINE",
            "ACTION",
        ] {
            if q.fact(key) != a.fact(key) {
                differences.push(format!(
                    "{}: {key} is {:?} under QEMU but {:?} under atoll",
                    scenario.name,
                    q.fact(key),
                    a.fact(key)
                ));
            }
        }
        if q.guest_end() != a.guest_end() {
            differences.push(format!(
                "{}: the guest ended {:?} under QEMU but {:?} under atoll",
                scenario.name,
                q.guest_end(),
                a.guest_end()
            ));
        }
        let kib = |o: &L2Outcome| {
            o.fact("MEMTOTAL_KB")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (qk, ak) = (kib(q), kib(a));
        // Firmware reservations differ (SeaBIOS vs none); more than 4% apart is not that.
        if qk.abs_diff(ak) * 25 > u64::from(scenario.memory_mib) * 1024 {
            differences.push(format!(
                "{}: MemTotal is {qk} KiB under QEMU but {ak} KiB under atoll",
                scenario.name
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "atoll differs from the QEMU reference:\n{}\nlogs: {} and {}",
        differences.join("\n"),
        outcome(Vmm::Qemu, &ONE_VCPU).log.display(),
        outcome(Vmm::Atoll, &ONE_VCPU).log.display()
    );
}
