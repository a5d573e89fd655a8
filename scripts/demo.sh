#!/usr/bin/env bash
# Sets up and boots a demo VM under atoll: a stock Debian kernel with a busybox shell on the
# serial console (this terminal). Installs what is missing, builds atoll, fetches the kernel.
# Where this machine's /dev/kvm cannot boot Linux (it is kvm_pvm, or missing), the demo runs
# inside the L1 testbed (QEMU-TCG with nested SVM) and says so; quit QEMU with Ctrl-A X.
# `./scripts/demo.sh --vmm qemu` boots the same guest under QEMU instead, for comparison.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$ATOLL_ROOT"

ensure_packages qemu-system-x86 busybox-static cpio
step build 3600 cargo build --release --workspace --bins
exec target/release/testbed demo "$@"
