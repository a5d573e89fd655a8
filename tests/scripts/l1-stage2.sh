#!/.testbed-l1/busybox sh
# Stage 2 of the L1 testbed guest, PID 1 inside the overlay of the host's `/`: mount the usual
# pseudo filesystems and the writable work share (at its host path), run `l1-script.sh` from the
# work share, record its exit status in `l1-result`, power off.
BB=/.testbed-l1/busybox
work=$1
mode=$2
$BB mount -t proc proc /proc
$BB mount -t sysfs sysfs /sys
$BB mount -t devtmpfs devtmpfs /dev
$BB mkdir -p /dev/pts /dev/shm
$BB mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$BB mount -t tmpfs tmpfs /dev/shm
# No tmpfs over /tmp: the workspace may live there (the overlay's upper layer is a tmpfs anyway).
$BB mount -t tmpfs tmpfs /run
$BB mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
$BB hostname testbed-l1
if ! $BB mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 work "$work"; then
    echo "TESTBED_L1_FATAL: mounting the work share at $work failed"
    $BB poweroff -f
fi
echo "TESTBED_L1 up after $(cut -d' ' -f1 /proc/uptime) s; kvm_amd nested=$(cat /sys/module/kvm_amd/parameters/nested) npt=$(cat /sys/module/kvm_amd/parameters/npt)"
cd "$work" || $BB poweroff -f
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
export TESTBED_WORK="$work" TESTBED_LEVEL=L1
if [ "$mode" = interactive ]; then
    # A session of its own with ttyS0 as controlling terminal, so that the console is a real
    # terminal for the script (job control, ^C reaches the foreground program).
    $BB dmesg -n 1
    export TERM="${TERM:-linux}"
    ($BB setsid -c /bin/sh "$work/l1-script.sh") </dev/ttyS0 >/dev/ttyS0 2>&1
    rc=$?
else
    { /bin/sh "$work/l1-script.sh" </dev/null; echo $? >/tmp/l1-rc; } 2>&1 | $BB tee "$work/l1-script.log"
    rc=$(cat /tmp/l1-rc)
fi
echo "TESTBED_L1_RESULT rc=$rc" >"$work/l1-result"
echo "TESTBED_L1_RESULT rc=$rc"
cd /
$BB sync
$BB umount "$work"
$BB poweroff -f
