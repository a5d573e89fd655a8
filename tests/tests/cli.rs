//! `atoll run` refuses bad usage with exit status 2 and a one-line error naming the option and
//! the value, before it starts anything. Runs `target/release/atoll` on the host (no L1), so it
//! needs `cargo build --release` first.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use atoll_tests::cmd::TimedCommand;
use atoll_tests::kernel::Kernel;
use atoll_tests::l2::atoll_status;
use atoll_tests::paths;

fn atoll() -> PathBuf {
    let atoll = paths::release_bin("atoll");
    assert!(
        atoll.is_file(),
        "{} does not exist: these tests run after `cargo build --release` \
         (scripts/test.sh does both)",
        atoll.display()
    );
    atoll
}

/// A real kernel, so that only the option under test is wrong.
fn vmlinuz() -> &'static Path {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    &KERNEL
        .get_or_init(|| {
            let cache = paths::cache_dir();
            std::fs::create_dir_all(&cache).expect("creating the kernel cache");
            Kernel::fetch(&cache).unwrap_or_else(|e| panic!("fetching the test kernel: {e}"))
        })
        .vmlinuz
}

fn run_atoll(args: &[&str]) -> Output {
    TimedCommand::new(atoll(), Duration::from_secs(60))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running atoll {args:?}: {e}"))
}

/// Status 2, nothing but one line on stderr, and that line names `option` and `value`.
fn assert_usage_error(args: &[&str], option: &str, value: &str) {
    let out = run_atoll(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        out.status.code(),
        Some(atoll_status::USAGE),
        "atoll {args:?} should exit with status 2; stderr: {stderr}"
    );
    assert_eq!(
        lines.len(),
        1,
        "atoll {args:?} should print a one-line error; stderr: {stderr}"
    );
    assert!(
        lines[0].contains(option) && lines[0].contains(value),
        "the error should name {option} and {value:?}: {}",
        lines[0]
    );
}

fn kernel_arg() -> String {
    vmlinuz().to_string_lossy().into_owned()
}

#[test]
fn help_documents_the_run_options() {
    let out = run_atoll(&["run", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "atoll run --help failed: {out:?}");
    for option in ["--kernel", "--initramfs", "--cmdline", "--cpus", "--memory"] {
        assert!(
            text.contains(option),
            "--help does not mention {option}: {text}"
        );
    }
}

#[test]
fn missing_kernel_file() {
    let path = "/nonexistent/atoll-test/vmlinuz";
    assert_usage_error(&["run", "--kernel", path], "--kernel", path);
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let dir = std::env::temp_dir().join(format!("atoll-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("not-a-kernel");
    std::fs::write(
        &file,
        "this is a text file, not a bzImage or ELF kernel\n".repeat(200),
    )
    .unwrap();
    let path = file.to_string_lossy().into_owned();
    assert_usage_error(&["run", "--kernel", &path], "--kernel", &path);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_with_an_unknown_unit() {
    let kernel = kernel_arg();
    assert_usage_error(
        &["run", "--kernel", &kernel, "--memory", "12Q"],
        "--memory",
        "12Q",
    );
}

#[test]
fn memory_larger_than_the_host() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let host_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal in /proc/meminfo");
    let too_much = format!("{}G", host_kib / (1024 * 1024) * 2 + 2);
    let kernel = kernel_arg();
    assert_usage_error(
        &["run", "--kernel", &kernel, "--memory", &too_much],
        "--memory",
        &too_much,
    );
}

#[test]
fn zero_cpus() {
    let kernel = kernel_arg();
    assert_usage_error(&["run", "--kernel", &kernel, "--cpus", "0"], "--cpus", "0");
}

#[test]
fn absurdly_many_cpus() {
    let kernel = kernel_arg();
    assert_usage_error(
        &["run", "--kernel", &kernel, "--cpus", "100000"],
        "--cpus",
        "100000",
    );
}
