#!/bin/busybox sh
# Prelude of every L2 test guest's /init. Scenario bodies append to it and call:
#   fact KEY VALUE    print "TESTBED_FACT KEY=VALUE" on the console (ttyS0)
#   standard_facts    the facts every scenario reports (CPUs, memory, kernel, ACPI, pvpanic)
#   finish            do what `testbed.action=` on the kernel command line says:
#                     poweroff (default), reboot, panic, or shell
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Only emergencies (panic, "reboot: Power down") may interleave with the facts from here on.
dmesg -n 1

fact() { echo "TESTBED_FACT $1=$2"; }

fact INIT started
failed=
for m in $(cat /etc/modules.load); do
    insmod "/lib/modules/$m.ko" || failed="$failed $m"
done
fact MODULES_FAILED "${failed# }"

cmdline_arg() { sed -n "s/.*testbed\\.$1=\\([^ ]*\\).*/\\1/p" /proc/cmdline; }

standard_facts() {
    fact UNAME_R "$(uname -r)"
    fact CPUS_ONLINE "$(cat /sys/devices/system/cpu/online)"
    fact NPROC "$(nproc)"
    fact MEMTOTAL_KB "$(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1/p' /proc/meminfo)"
    fact ACPI_TABLES "$(ls /sys/firmware/acpi/tables 2>/dev/null | grep -v -e '^data$' -e '^dynamic$' | tr '\n' ' ')"
    fact PVPANIC "$(ls /sys/bus/platform/drivers/pvpanic-mmio 2>/dev/null | grep : | tr '\n' ' ')"
    fact CMDLINE "$(cat /proc/cmdline)"
}

finish() {
    action=$(cmdline_arg action)
    action=${action:-poweroff}
    fact ACTION "$action"
    case "$action" in
    poweroff) poweroff -f ;;
    reboot) reboot -f ;;
    panic) echo c >/proc/sysrq-trigger ;;
    shell)
        (setsid -c sh) </dev/ttyS0 >/dev/ttyS0 2>&1
        poweroff -f
        ;;
    *) fact ACTION_UNKNOWN "$action" ;;
    esac
    # Reached only when the action did not end the VM. PID 1 must not exit (that panics).
    fact ACTION_RETURNED 1
    while :; do sleep 3600; done
}
