#!/bin/busybox sh
# Stage 1 of the L1 testbed guest (see TESTBED.md): load the KVM, 9p and overlay modules, mount
# the host's `/` read-only over 9p as the lower layer of an overlay with a tmpfs upper layer, and
# switch_root into it. (A chroot would forbid user namespaces, which confinement tests need.)
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

die() {
    echo "TESTBED_L1_FATAL: $*"
    poweroff -f
}

for m in $(cat /etc/modules.load); do
    insmod "/lib/modules/$m.ko" || die "insmod $m failed"
done

arg() { sed -n "s/.*testbed\\.$1=\\([^ ]*\\).*/\\1/p" /proc/cmdline; }
work=$(arg work)
mode=$(arg mode)
[ -n "$work" ] || die "no testbed.work= on the kernel command line"

mkdir -p /host /ovl /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro hostroot /host ||
    die "mounting the host's / over 9p failed"
mount -t tmpfs -o mode=0755 tmpfs /ovl
mkdir -p /ovl/upper /ovl/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work /newroot ||
    die "mounting the overlay over the host's / failed"
mkdir -p /newroot/.testbed-l1
cp /bin/busybox /newroot/.testbed-l1/busybox
cp /etc/stage2 /newroot/.testbed-l1/stage2
umount /proc /sys /dev
exec switch_root /newroot /.testbed-l1/stage2 "$work" "${mode:-batch}"
