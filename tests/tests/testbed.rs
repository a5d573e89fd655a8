//! The L1 machinery itself: the environment a script gets in L1, and the detection and retry of
//! L1 runs that fail by themselves. These always boot L1 (also on hosts with a real KVM).

use atoll_tests::Testbed;
use atoll_tests::l1::{self, L1Error, L1Options};

fn testbed() -> Testbed {
    Testbed::setup().unwrap_or_else(|e| panic!("setting up the testbed: {e}"))
}

#[test]
fn l1_runs_scripts_in_the_hosts_root_with_kvm_and_user_namespaces() {
    let testbed = testbed();
    let work = testbed.work_dir("testbed-env").unwrap();
    let cargo_toml = atoll_tests::paths::workspace_root().join("Cargo.toml");
    let script = r#"
set -u
echo "kvm=$(test -c /dev/kvm && echo yes || echo no)"
echo "nested=$(cat /sys/module/kvm_amd/parameters/nested)"
echo "userns_uid=$(unshare -U -r id -u)"
echo "cargo_toml=$(test -f "$1" && echo visible || echo missing)"
echo "root_writable=$(touch /etc/testbed-probe 2>/dev/null && echo yes || echo no)"
echo "written in L1" > from-l1.txt
exit 7
"#;
    // The host's files are visible at their host paths.
    let script = format!(
        "set -- {}\n{script}",
        atoll_tests::cmd::shell_quote(&cargo_toml.to_string_lossy())
    );
    let run = l1::run(
        &testbed.kernel,
        &work,
        &script,
        &L1Options::default(),
        false,
    )
    .unwrap_or_else(|e| panic!("L1 run failed: {e}"));
    let log = std::fs::read_to_string(work.join(l1::SCRIPT_LOG)).unwrap_or_default();
    assert_eq!(
        run.status, 7,
        "the script's exit status is the run's; log: {log}"
    );
    assert_eq!(run.l1_boots, 1, "no retry was needed; log: {log}");
    for line in [
        "kvm=yes",
        "nested=1",
        "userns_uid=0",
        "cargo_toml=visible",
        "root_writable=yes",
    ] {
        assert!(
            log.lines().any(|l| l == line),
            "no {line:?} in L1's output: {log}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(work.join("from-l1.txt")).unwrap_or_default(),
        "written in L1\n",
        "files written to the work directory in L1 reach the host"
    );
}

#[test]
fn l1_failures_are_detected_and_retried_once() {
    let testbed = testbed();
    let work = testbed.work_dir("testbed-retry").unwrap();
    // First run: finishes normally but a soft lockup shows on the console, which must not
    // count. Second run: L1 resets without writing its result.
    let script = r#"
if [ ! -e attempt-1 ]; then
    touch attempt-1
    echo "<0>watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [testbed-fake]" > /dev/kmsg
    exit 0
fi
touch attempt-2
sync
echo b > /proc/sysrq-trigger
sleep 60
"#;
    let err = l1::run(&testbed.kernel, &work, script, &L1Options::default(), false)
        .expect_err("two failed L1 runs must be an error");
    assert!(
        matches!(&err, L1Error::Flaky { reason, .. } if reason.contains("without writing its result")),
        "expected the second failure (no result) to be reported: {err}"
    );
    assert!(work.join("attempt-1").exists() && work.join("attempt-2").exists());
    assert!(!work.join("attempt-3").exists());
}

/// On hosts with a real KVM, scripts run directly, from their work directory.
#[test]
fn direct_runs_scripts_on_the_host_like_l1_does() {
    let testbed = testbed();
    let work = testbed.work_dir("testbed-direct").unwrap();
    let script = "echo \"in $(pwd) work=$TESTBED_WORK\"\necho out > from-script.txt\nexit 5\n";
    let run = l1::run_direct(&work, script, std::time::Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("direct run failed: {e}"));
    let work = std::fs::canonicalize(&work).unwrap();
    let log = std::fs::read_to_string(&run.log).unwrap();
    assert_eq!(run.status, 5, "{log}");
    assert_eq!(run.l1_boots, 0);
    let expected = format!("in {0} work={0}", work.display());
    assert!(log.lines().any(|l| l == expected), "{log}");
    assert_eq!(
        std::fs::read_to_string(work.join("from-script.txt")).unwrap(),
        "out\n"
    );
}
