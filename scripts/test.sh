#!/usr/bin/env bash
# Sets up and runs atoll's whole test suite; this is what CI runs (.ci/run).
# Needs Debian (apt) for QEMU, busybox-static and the test kernel; installs what is missing.
# The whole-VM tests boot guests in the nested-KVM testbed (tests/, TESTBED.md), so they run
# after the release build: they use target/release/atoll.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ATOLL_ROOT"

ensure_packages qemu-system-x86 busybox-static cpio acpica-tools qemu-utils iproute2 procps
step build 3600 cargo build --release --workspace --all-targets
# The escape-attempt builds of the confined binaries (test-only feature; tests/confinement.rs).
step build-selftest 3600 cargo build --release --target-dir target/selftest \
    -p vmm-core -p dev-blk -p dev-net --features \
    vmm-core/confinement-selftest,dev-blk/confinement-selftest,dev-net/confinement-selftest
step format 300 cargo fmt --all --check
step lint 3600 cargo clippy --workspace --all-targets -- -D warnings
step test 5400 cargo test --release --workspace --no-fail-fast
