//! Network scenarios: an L2 `/init` that brings its virtio-net cards up, reports what it sees
//! (MAC, link, MTU, queues, driver), pings L1, fetches a file from L1 over each card and
//! serves a file of its own; and the L1 script around it that creates the taps, serves and
//! fetches files with busybox `httpd`/`wget`, pings the guest and records checksums on its side.
//! (Debian 12's static busybox 1.35 crashes on `wget -T`: time limits come from `timeout`.)
//!
//! Every transfer is checked end to end by md5: the guest reports the digest of what it
//! received and of what it served, L1 records the digest of what it served and of what it
//! received, and the test compares the pairs.

use std::fmt::Write as _;
use std::path::Path;

use crate::cmd::shell_quote;
use crate::initramfs::L2_PRELUDE;
use crate::kernel::Kernel;
use crate::l2::{self, L2Boot};

/// The network guest's modules: virtio-pci, virtio-net (its failover dependencies come along)
/// and pvpanic.
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_net", "pvpanic", "pvpanic-mmio"];

/// Size of each transferred file.
pub const TRANSFER_MIB: u32 = 4;

/// One card of a network scenario: the `--net` value and the /24 it lives on (L1 is `.1`,
/// the guest `.2`).
#[derive(Clone, Debug)]
pub struct Card {
    /// The tap interface in L1.
    pub tap: String,
    /// Create the tap with `multi_queue`.
    pub multi_queue: bool,
    /// The whole `--net` value.
    pub net: String,
    /// The MAC the guest must see, when the test fixes it.
    pub mac: Option<String>,
    /// e.g. `10.0.0` for 10.0.0.0/24.
    pub subnet: String,
}

/// The guest's `/init` body after [`L2_PRELUDE`]. The kernel command line names the cards as
/// `testbed.nics=MAC@SUBNET,...` (MAC `-` for "any": then cards are taken in `ethN` order).
/// Per card N (in that order) it reports `NICN_IF`, `NICN_MAC`, `NICN_DRIVER`, `NICN_MTU`,
/// `NICN_CARRIER`, `NICN_RXQ`/`NICN_TXQ` (queue counts), `NICN_PING` (`ok` or `failed`:
/// three pings to L1), `NICN_H2G_MD5` (md5 of `http://SUBNET.1:8080/h2g.bin`). It then serves
/// `/www/g2h.bin` (random, `G2H_MD5`) on port 8080 and waits (at most `testbed.wait` s) until
/// L1 publishes `done`, reporting `L1_DONE`.
const GUEST_BODY: &str = r#"
standard_facts
fact NETDEVS "$(ls /sys/class/net | tr '\n' ' ')"
mkdir -p /www
n=0
for spec in $(cmdline_arg nics | tr , ' '); do
    mac=${spec%@*}
    subnet=${spec#*@}
    ifc=
    for dev in /sys/class/net/eth*; do
        [ -e "$dev" ] || continue
        if [ "$mac" = - ] && [ "${dev##*/}" = "eth$n" ]; then ifc=${dev##*/}; fi
        if [ "$mac" != - ] && [ "$(cat "$dev/address")" = "$mac" ]; then ifc=${dev##*/}; fi
    done
    fact "NIC${n}_IF" "$ifc"
    if [ -n "$ifc" ]; then
        d=/sys/class/net/$ifc
        ip addr add "$subnet.2/24" dev "$ifc"
        ip link set "$ifc" up
        i=0
        while [ "$(cat $d/carrier 2>/dev/null)" != 1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
        fact "NIC${n}_MAC" "$(cat $d/address)"
        fact "NIC${n}_DRIVER" "$(basename "$(readlink $d/device/driver)")"
        fact "NIC${n}_MTU" "$(cat $d/mtu)"
        fact "NIC${n}_CARRIER" "$(cat $d/carrier)"
        fact "NIC${n}_RXQ" "$(ls -d $d/queues/rx-* | wc -l)"
        fact "NIC${n}_TXQ" "$(ls -d $d/queues/tx-* | wc -l)"
        if ping -c 3 -W 5 "$subnet.1" >/tmp/ping.$n 2>&1; then
            fact "NIC${n}_PING" ok
        else
            fact "NIC${n}_PING" "failed: $(tail -n 2 /tmp/ping.$n | tr '\n' ' ')"
        fi
        if timeout 60 wget -O /tmp/h2g.$n "http://$subnet.1:8080/h2g.bin" 2>/tmp/wget.err; then
            fact "NIC${n}_H2G_MD5" "$(md5sum /tmp/h2g.$n | cut -d' ' -f1)"
        else
            fact "NIC${n}_H2G_MD5" "wget failed: $(tr '\n' ' ' </tmp/wget.err)"
        fi
        rm -f /tmp/h2g.$n
        first_subnet=${first_subnet:-$subnet}
    fi
    n=$((n + 1))
done
dd if=/dev/urandom of=/www/g2h.bin bs=1M count=__MIB__ 2>/dev/null
fact G2H_MD5 "$(md5sum /www/g2h.bin | cut -d' ' -f1)"
httpd -p 8080 -h /www
fact SERVING 1
wait=$(cmdline_arg wait)
i=0
done=timeout
while [ $i -lt "${wait:-180}" ]; do
    if timeout 5 wget -q -O /tmp/done "http://$first_subnet.1:8080/done" 2>/dev/null; then done=ok; break; fi
    sleep 1
    i=$((i + 1))
done
fact L1_DONE "$done"
finish
"#;

/// The network guest's whole `/init`.
pub fn guest_init() -> String {
    format!(
        "{L2_PRELUDE}{}",
        GUEST_BODY.replace("__MIB__", &TRANSFER_MIB.to_string())
    )
}

/// The guest kernel command line for `cards`.
pub fn guest_cmdline(cards: &[Card], wait_secs: u64) -> String {
    let nics: Vec<String> = cards
        .iter()
        .map(|c| format!("{}@{}", c.mac.as_deref().unwrap_or("-"), c.subnet))
        .collect();
    format!(
        "console=ttyS0 testbed.nics={} testbed.wait={wait_secs}",
        nics.join(",")
    )
}

/// A POSIX shell script for L1: creates each card's tap (`.1` of its subnet, up), serves a
/// random `h2g.bin` (its md5 in `<out>/h2g.md5`) with busybox httpd on port 8080, boots
/// `boot` under atoll with the cards in the background (`<out>/<name>.log`, `.rc` as
/// [`l2::script_start`]), waits until the guest serves `g2h.bin`, then per card N: pings
/// the guest (`<out>/ping<N>.rc`), fetches `g2h.bin` over that card (`<out>/g2h<N>.md5`),
/// and finally publishes `done` and waits for the boot to end.
pub fn l1_script(
    boot: &L2Boot,
    cards: &[Card],
    kernel: &Kernel,
    atoll: &Path,
    out: &Path,
) -> String {
    let mut script = l2::script_start(out);
    script.push_str("set -u\n");
    for c in cards {
        let tap = shell_quote(&c.tap);
        let mq = if c.multi_queue { " multi_queue" } else { "" };
        let _ = writeln!(
            script,
            "ip link del {tap} 2>/dev/null\nip tuntap add {tap} mode tap{mq} || echo TESTBED_NET tuntap-failed\n\
             ip addr add {}.1/24 dev {tap}\nip link set {tap} up",
            c.subnet
        );
    }
    let _ = writeln!(
        script,
        r#"www=$tmp/www
mkdir -p "$www"
dd if=/dev/urandom of="$www/h2g.bin" bs=1M count={TRANSFER_MIB} 2>/dev/null
md5sum "$www/h2g.bin" | cut -d' ' -f1 >"$out/h2g.md5"
busybox httpd -p 8080 -h "$www"
"#
    );
    let mut command = boot.command(kernel, atoll);
    for c in cards {
        command.push("--net".to_owned());
        command.push(c.net.clone());
    }
    let run = l2::run_command_line(boot, &command);
    let _ = write!(script, "{} &\nboot=$!\n", run.trim_end());
    let first = &cards[0].subnet;
    let _ = writeln!(
        script,
        r#"i=0
while [ $i -lt {secs} ] && kill -0 $boot 2>/dev/null; do
    if timeout 5 busybox wget -q -O /dev/null "http://{first}.2:8080/g2h.bin" 2>/dev/null; then break; fi
    sleep 1
    i=$((i + 1))
done
echo "TESTBED_NET guest serving after $i s""#,
        secs = boot.timeout.as_secs()
    );
    for (n, c) in cards.iter().enumerate() {
        let s = &c.subnet;
        let _ = writeln!(
            script,
            r#"busybox ping -c 3 -W 5 {s}.2 >"$out/ping{n}.log" 2>&1; echo $? >"$out/ping{n}.rc"
if timeout 60 busybox wget -q -O "$tmp/g2h{n}.bin" "http://{s}.2:8080/g2h.bin"; then
    md5sum "$tmp/g2h{n}.bin" | cut -d' ' -f1 >"$out/g2h{n}.md5"
else
    echo "wget failed" >"$out/g2h{n}.md5"
fi"#
        );
    }
    script.push_str("touch \"$www/done\"\nwait $boot\n");
    for c in cards {
        let _ = writeln!(script, "ip link del {} 2>/dev/null", shell_quote(&c.tap));
    }
    script.push_str(l2::SCRIPT_END);
    script
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l2::Vmm;
    use std::time::Duration;

    fn cards() -> Vec<Card> {
        vec![
            Card {
                tap: "tap0".into(),
                multi_queue: false,
                net: "tap=tap0,mac=52:54:00:12:34:56".into(),
                mac: Some("52:54:00:12:34:56".into()),
                subnet: "10.0.0".into(),
            },
            Card {
                tap: "tap1".into(),
                multi_queue: true,
                net: "tap=tap1,queues=2".into(),
                mac: None,
                subnet: "10.0.1".into(),
            },
        ]
    }

    #[test]
    fn cmdline_lists_cards_in_order() {
        assert_eq!(
            guest_cmdline(&cards(), 99),
            "console=ttyS0 testbed.nics=52:54:00:12:34:56@10.0.0,-@10.0.1 testbed.wait=99"
        );
    }

    #[test]
    fn script_creates_taps_boots_in_background_and_checks_each_card() {
        let boot = L2Boot {
            name: "net".into(),
            vmm: Vmm::Atoll,
            cpus: 2,
            memory_mib: 256,
            cmdline: guest_cmdline(&cards(), 60),
            initramfs: "/w/net.cpio".into(),
            timeout: Duration::from_secs(200),
        };
        let kernel = Kernel {
            package: "linux-image-x".into(),
            release: "x".into(),
            vmlinuz: "/k/vmlinuz-x".into(),
            modules_dir: "/k/lib/modules/x".into(),
        };
        let s = l1_script(
            &boot,
            &cards(),
            &kernel,
            Path::new("/t/atoll"),
            Path::new("/w/out"),
        );
        assert!(s.contains("ip tuntap add tap0 mode tap ||"));
        assert!(s.contains("ip tuntap add tap1 mode tap multi_queue ||"));
        assert!(s.contains("--net tap=tap0,mac=52:54:00:12:34:56 --net tap=tap1,queues=2 &"));
        assert!(!s.contains("ping{n}.rc") && s.contains("ping1.rc"));
        assert!(s.contains("http://10.0.1.2:8080/g2h.bin"));
        assert!(s.find("touch \"$www/done\"") < s.find("wait $boot"));
        assert!(guest_init().contains("count=4"));
    }
}
