#!/usr/bin/env bash
# Sets up and runs atoll's whole test suite; this is what CI runs (.ci/run).
# Needs Debian (apt) for QEMU, busybox-static and the test kernel; installs what is missing.
# The whole-VM tests boot guests in the nested-KVM testbed (tests/, TESTBED.md), so they run
# after the release build: they use target/release/atoll.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ATOLL_ROOT"

ensure_packages qemu-system-x86 busybox-static cpio acpica-tools qemu-utils
step build 3600 cargo build --release --workspace --all-targets
step format 300 cargo fmt --all --check
step lint 3600 cargo clippy --workspace --all-targets -- -D warnings
step test 5400 cargo test --release --workspace
