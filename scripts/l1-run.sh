#!/usr/bin/env bash
# l1-run.sh SCRIPT [--interactive] [--timeout SECS]
# Runs a shell script inside the L1 testbed guest (directly on a host with a real KVM), after
# building the workspace's binaries (skip with TESTBED_NO_BUILD=1). The script sees
#   $ATOLL              target/release/atoll
#   $TESTBED_KERNEL     the Debian vmlinuz
#   $TESTBED_INITRAMFS  the facts guest (prints TESTBED_FACT KEY=VALUE lines, then does
#                       testbed.action=poweroff|reboot|panic|shell from its command line)
#   $TESTBED_WORK       its writable work directory (also the current directory)
# Its output is printed when L1 has powered off (live with --interactive). Example script:
#   $ATOLL run --kernel "$TESTBED_KERNEL" --initramfs "$TESTBED_INITRAMFS" \
#       --cmdline "console=ttyS0 testbed.action=reboot" --cpus 2 --memory 512M \
#       </dev/null >/tmp/console.log 2>&1
#   echo "atoll exited with $?"; cp /tmp/console.log .
# Send a VMM's console to /tmp inside L1 and copy it afterwards: the work directory is a 9p
# share, and a serial console written to it byte by byte makes a boot several times slower.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
if [ -z "${TESTBED_NO_BUILD:-}" ]; then
    step build 3600 cargo build --release --workspace --bins --manifest-path "$ATOLL_ROOT/Cargo.toml"
fi
exec "$ATOLL_ROOT/target/release/testbed" l1 "$@"
