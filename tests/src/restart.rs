//! Device restart under load (DESIGN.md §4): an L2 guest writes checksummed data to its disk
//! and reads it back in a loop while L1 kills `dev-blk` with SIGKILL at random moments; the
//! launcher restarts it, the core reconnects and replays the rings. The guest reports every
//! round that did not verify and every I/O error its kernel logged.

use std::fmt::Write as _;
use std::path::Path;

use crate::cmd::shell_quote;
use crate::initramfs::L2_PRELUDE;
use crate::kernel::Kernel;
use crate::l2::{self, L2Boot};

/// The guest's modules.
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "pvpanic", "pvpanic-mmio"];

/// Size of one round's chunk (the disk holds [`SLOTS`] of them).
pub const CHUNK_KIB: u32 = 512;
/// Chunks on the disk.
pub const SLOTS: u32 = 16;

/// The guest's `/init` body: prints `LOOP_START`, then until L1 writes `STOP` at the start of
/// the control slot (the chunk after the [`SLOTS`] data slots), or `testbed.secs` seconds
/// pass, writes a fresh random chunk to the next slot of `/dev/vda` with `conv=fsync`, drops
/// the page cache, reads the slot back (uncached) and compares md5s. Reports
/// `ROUNDS`, `BAD_ROUNDS` (slots whose read-back differed, or dd failures), `IO_ERRORS` (kernel
/// log lines about I/O errors on vda) and `FIRST_BAD` (a description of the first failure).
const GUEST_BODY: &str = r#"
secs=$(cmdline_arg secs)
fact LOOP_START "$(date +%s)"
end=$(( $(date +%s) + ${secs:-30} ))
rounds=0
bad=0
first_bad=
slot=0
stopped=no
while [ "$(date +%s)" -lt "$end" ]; do
    if [ "$(dd if=/dev/vda bs=1k skip=$((__SLOTS__ * __KIB__)) count=1 2>/dev/null | head -c 4)" = STOP ]; then
        stopped=yes
        break
    fi
    dd if=/dev/urandom of=/tmp/chunk bs=1k count=__KIB__ 2>/dev/null
    want=$(md5sum /tmp/chunk | cut -d' ' -f1)
    if ! msg=$(dd if=/tmp/chunk of=/dev/vda bs=1k seek=$((slot * __KIB__)) conv=notrunc,fsync 2>&1); then
        bad=$((bad + 1))
        first_bad=${first_bad:-"write slot $slot: $msg"}
    fi
    echo 3 >/proc/sys/vm/drop_caches
    got=$(dd if=/dev/vda bs=1k skip=$((slot * __KIB__)) count=__KIB__ 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
        bad=$((bad + 1))
        first_bad=${first_bad:-"slot $slot read back $got, wrote $want"}
    fi
    rounds=$((rounds + 1))
    slot=$(( (slot + 1) % __SLOTS__ ))
done
fact STOPPED_BY_L1 "$stopped"
fact ROUNDS "$rounds"
fact BAD_ROUNDS "$bad"
fact FIRST_BAD "$first_bad"
fact IO_ERRORS "$(dmesg | grep -c -i -e 'I/O error' -e 'blk_update_request' -e 'Buffer I/O')"
finish
"#;

/// The guest's whole `/init`.
pub fn guest_init() -> String {
    let body = GUEST_BODY
        .replace("__KIB__", &CHUNK_KIB.to_string())
        .replace("__SLOTS__", &SLOTS.to_string());
    format!("{L2_PRELUDE}{body}")
}

/// The guest's kernel command line: loop for `secs` seconds.
pub fn guest_cmdline(secs: u32) -> String {
    format!("console=ttyS0 testbed.secs={secs}")
}

/// A POSIX shell script for L1: creates a zeroed disk image in L1's own `/tmp`, boots
/// `boot` under atoll with it in the background, waits for the guest's `LOOP_START`, then
/// `kills` times: waits a random 0.3 to 1.5 s, SIGKILLs the current `dev-blk` and waits for
/// the launcher to start a new one (`<out>/kills` gets one line per kill: old pid, new pid).
/// Then it writes `STOP` into the control slot (see [`guest_init`]) and waits for the boot
/// to end.
pub fn l1_script(boot: &L2Boot, kills: u32, kernel: &Kernel, atoll: &Path, out: &Path) -> String {
    let mut script = l2::script_start(out);
    let img = "$tmp/restart.img";
    let _ = writeln!(
        script,
        "dd if=/dev/zero of={img} bs=1k count={} 2>/dev/null",
        CHUNK_KIB * (SLOTS + 1)
    );
    let disk = format!("path={img}");
    script.push_str(&start_boot_and_wait_for_loop(
        boot,
        &["--disk", &disk],
        kernel,
        atoll,
    ));
    let _ = write!(
        script,
        r#": >"$out/kills"
{kill_loop}sleep 2
printf STOP | dd of={img} bs=1k seek={control} conv=notrunc 2>/dev/null
wait $boot
"#,
        control = CHUNK_KIB * SLOTS,
        kill_loop = kill_loop("dev-blk", kills),
    );
    script.push_str(l2::SCRIPT_END);
    script
}

/// The failing-device guest's `/init` body: prints `LOOP_START`, then writes 4 KiB with
/// fsync to `/dev/vda` every 0.1 s until a write fails or `testbed.secs` pass; reports
/// `DD_ERROR` (dd's message, empty if none failed) and `WRITES` (how many succeeded).
const FAIL_GUEST_BODY: &str = r#"
secs=$(cmdline_arg secs)
fact LOOP_START "$(date +%s)"
end=$(( $(date +%s) + ${secs:-30} ))
err=
writes=0
while [ "$(date +%s)" -lt "$end" ]; do
    if ! dd if=/dev/urandom of=/dev/vda bs=4k count=1 conv=notrunc,fsync 2>/tmp/dd.err; then
        err=$(tr '\n' ' ' </tmp/dd.err)
        break
    fi
    writes=$((writes + 1))
    sleep 0.1
done
fact WRITES "$writes"
fact DD_ERROR "$err"
finish
"#;

/// The failing-device guest's whole `/init`.
pub fn fail_guest_init() -> String {
    format!("{L2_PRELUDE}{FAIL_GUEST_BODY}")
}

/// A POSIX shell script for L1: boots `boot` with a disk in the background and, once the
/// guest loops, SIGKILLs every new `dev-blk` as soon as it appears, until none comes back for
/// 5 s (the launcher gave up: restart budget spent) or `max_kills` were done; `<out>/kills`
/// counts them. Then it waits for the boot to end.
pub fn fail_l1_script(
    boot: &L2Boot,
    max_kills: u32,
    kernel: &Kernel,
    atoll: &Path,
    out: &Path,
) -> String {
    let mut script = l2::script_start(out);
    let img = "$tmp/fail.img";
    let _ = writeln!(script, "dd if=/dev/zero of={img} bs=1M count=4 2>/dev/null");
    let disk = format!("path={img}");
    script.push_str(&start_boot_and_wait_for_loop(
        boot,
        &["--disk", &disk],
        kernel,
        atoll,
    ));
    let _ = write!(
        script,
        r#"k=0
while [ $k -lt {max_kills} ] && kill -0 $boot 2>/dev/null; do
    j=0
    pid=
    while [ $j -lt 100 ]; do
        pid=$(pgrep -x dev-blk | head -n 1)
        [ -n "$pid" ] && break
        sleep 0.05
        j=$((j + 1))
    done
    [ -n "$pid" ] || break
    kill -KILL "$pid"
    k=$((k + 1))
done
echo "$k" >"$out/kills"
wait $boot
"#
    );
    script.push_str(l2::SCRIPT_END);
    script
}

/// The network guest's modules.
pub const NET_GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_net", "pvpanic", "pvpanic-mmio"];

/// The network guest's `/init` body: brings `eth0` up as 10.0.0.2/24, prints `LOOP_START`,
/// then until `http://10.0.0.1:8080/stop` exists (or `testbed.secs` pass) fetches
/// `big.bin` from L1 and compares its md5 with `big.md5`. Reports `ROUNDS`, `BAD_ROUNDS`
/// (digest mismatches), `WGET_FAILED` and `FIRST_BAD`.
const NET_GUEST_BODY: &str = r#"
ip addr add 10.0.0.2/24 dev eth0
ip link set eth0 up
i=0
while ! timeout 5 wget -q -O /tmp/big.md5 http://10.0.0.1:8080/big.md5 && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
want=$(cut -d' ' -f1 /tmp/big.md5)
fact WANT "$want"
secs=$(cmdline_arg secs)
fact LOOP_START "$(date +%s)"
end=$(( $(date +%s) + ${secs:-30} ))
rounds=0
bad=0
failed=0
first_bad=
stopped=no
while [ "$(date +%s)" -lt "$end" ]; do
    if timeout 5 wget -q -O /dev/null http://10.0.0.1:8080/stop 2>/dev/null; then stopped=yes; break; fi
    if timeout 60 wget -q -O /tmp/big.bin http://10.0.0.1:8080/big.bin; then
        got=$(md5sum /tmp/big.bin | cut -d' ' -f1)
        if [ "$got" != "$want" ]; then
            bad=$((bad + 1))
            first_bad=${first_bad:-"round $rounds: md5 $got"}
        fi
    else
        failed=$((failed + 1))
        first_bad=${first_bad:-"round $rounds: wget failed"}
    fi
    rm -f /tmp/big.bin
    rounds=$((rounds + 1))
done
fact STOPPED_BY_L1 "$stopped"
fact ROUNDS "$rounds"
fact BAD_ROUNDS "$bad"
fact WGET_FAILED "$failed"
fact FIRST_BAD "$first_bad"
finish
"#;

/// The network guest's whole `/init`.
pub fn net_guest_init() -> String {
    format!("{L2_PRELUDE}{NET_GUEST_BODY}")
}

/// A POSIX shell script for L1: tap0 as 10.0.0.1/24, a random 8 MiB `big.bin` and its
/// `big.md5` served by busybox httpd; boots `boot` with `--net tap=tap0` in the background;
/// after the guest's `LOOP_START` runs `ping -A` (as fast as replies come) at the guest for
/// the whole time while it SIGKILLs `dev-net` `kills` times like [`l1_script`]
/// (`<out>/kills`); then `ping -c 3` (`<out>/ping-after.rc`), publishes `stop` and waits. The
/// flood's summary is in `<out>/flood.log`.
pub fn net_l1_script(
    boot: &L2Boot,
    kills: u32,
    kernel: &Kernel,
    atoll: &Path,
    out: &Path,
) -> String {
    let mut script = l2::script_start(out);
    script.push_str(
        r#"ip link del tap0 2>/dev/null
ip tuntap add tap0 mode tap
ip addr add 10.0.0.1/24 dev tap0
ip link set tap0 up
www=$tmp/www
mkdir -p "$www"
dd if=/dev/urandom of="$www/big.bin" bs=1M count=8 2>/dev/null
md5sum "$www/big.bin" >"$www/big.md5"
busybox httpd -p 8080 -h "$www"
"#,
    );
    script.push_str(&start_boot_and_wait_for_loop(
        boot,
        &["--net", "tap=tap0"],
        kernel,
        atoll,
    ));
    let _ = write!(
        script,
        r#"busybox ping -A -q -w 600 10.0.0.2 >"$out/flood.log" 2>&1 &
flood=$!
: >"$out/kills"
{kill_loop}sleep 2
kill -INT $flood
wait $flood
busybox ping -c 3 -W 5 10.0.0.2 >"$out/ping-after.log" 2>&1
echo $? >"$out/ping-after.rc"
touch "$www/stop"
wait $boot
ip link del tap0 2>/dev/null
"#,
        kill_loop = kill_loop("dev-net", kills),
    );
    script.push_str(l2::SCRIPT_END);
    script
}

/// Shell lines that start `boot` under atoll in the background (`$boot` is its pid) with
/// `args` appended (`--disk path=$tmp/...` stays unquoted so the shell expands `$tmp`), then
/// wait until the guest prints `LOOP_START` (at most the boot's time limit).
fn start_boot_and_wait_for_loop(
    boot: &L2Boot,
    args: &[&str],
    kernel: &Kernel,
    atoll: &Path,
) -> String {
    let mut command = boot.command(kernel, atoll);
    let mut expand = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        if arg.contains('$') {
            let placeholder = format!("ATOLL_TESTS_ARG_{i}");
            expand.push((placeholder.clone(), (*arg).to_owned()));
            command.push(placeholder);
        } else {
            command.push((*arg).to_owned());
        }
    }
    let mut run = l2::run_command_line(boot, &command);
    for (placeholder, arg) in expand {
        run = run.replace(&placeholder, &arg);
    }
    format!(
        "{} &\nboot=$!\ni=0\nwhile [ $i -lt {secs} ] && ! grep -q LOOP_START \"$tmp/\"{name}.log 2>/dev/null; do\n    sleep 0.2\n    i=$((i + 1))\ndone\n",
        run.trim_end(),
        secs = boot.timeout.as_secs() * 5,
        name = shell_quote(&boot.name),
    )
}

/// Shell lines that `kills` times wait a random 0.3 to 1.5 s, SIGKILL the running `process`
/// and wait for the launcher to start a new one, appending "old-pid new-pid" to
/// `$out/kills`; they stop early when the boot (`$boot`) ends.
fn kill_loop(process: &str, kills: u32) -> String {
    format!(
        r#"k=0
while [ $k -lt {kills} ] && kill -0 $boot 2>/dev/null; do
    sleep "$(awk 'BEGIN {{ srand(); printf "%.2f", 0.3 + rand() * 1.2 }}')"
    old=$(pgrep -x {process} | head -n 1)
    [ -n "$old" ] || {{ sleep 0.05; continue; }}
    kill -KILL "$old"
    j=0
    new=
    while [ $j -lt 200 ]; do
        new=$(pgrep -x {process} | grep -v "^$old$" | head -n 1)
        [ -n "$new" ] && break
        sleep 0.05
        j=$((j + 1))
    done
    echo "$old $new" >>"$out/kills"
    k=$((k + 1))
done
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l2::Vmm;
    use std::time::Duration;

    #[test]
    fn script_kills_after_the_loop_started_and_waits_for_the_boot() {
        let boot = L2Boot {
            name: "kills".into(),
            vmm: Vmm::Atoll,
            cpus: 1,
            memory_mib: 256,
            cmdline: guest_cmdline(40),
            initramfs: "/w/r.cpio".into(),
            timeout: Duration::from_secs(300),
        };
        let kernel = Kernel {
            package: "linux-image-x".into(),
            release: "x".into(),
            vmlinuz: "/k/vmlinuz-x".into(),
            modules_dir: "/k/lib/modules/x".into(),
        };
        let s = l1_script(
            &boot,
            20,
            &kernel,
            Path::new("/t/atoll"),
            Path::new("/w/out"),
        );
        assert!(s.contains("--disk path=$tmp/restart.img &"), "{s}");
        assert!(s.contains("while [ $k -lt 20 ]"));
        assert!(s.find("LOOP_START") < s.find("kill -KILL"));
        assert!(guest_init().contains("count=512"));
        assert_eq!(guest_cmdline(40), "console=ttyS0 testbed.secs=40");
    }
}
