#!/usr/bin/env bash
# l2-boot.sh [--vmm atoll|qemu|both] [--cpus N] [--memory MIB] [--cmdline STR]
#            [--action poweroff|reboot|panic] [--initramfs PATH] [--timeout SECS]
# Boots the facts guest once (inside L1 unless this host's KVM is real) and prints its
# console, exit status and TESTBED_FACT lines; with --vmm both, QEMU then atoll and the facts
# that differ. Builds the workspace's binaries first (skip with TESTBED_NO_BUILD=1).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
if [ -z "${TESTBED_NO_BUILD:-}" ]; then
    step build 3600 cargo build --release --workspace --bins --manifest-path "$ATOLL_ROOT/Cargo.toml"
fi
exec "$ATOLL_ROOT/target/release/testbed" boot "$@"
