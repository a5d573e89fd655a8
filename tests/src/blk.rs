//! Block-device scenarios: disk images the test fills with random bytes and remembers, an L2
//! `/init` that reports every virtio disk it sees (size, read-only flag, hardware queues, md5
//! of its contents) and writes a marker with fsync to the disks named on its command line,
//! and a shell script that boots such guests under atoll with `--disk`, next to a
//! qemu-storage-daemon export when a scenario asks for one.
//!
//! The images stay on the host (in L1 they are on the 9p work share), so the test process
//! itself checks what the guest did to them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cmd::{CmdError, TimedCommand, shell_quote};
use crate::initramfs::L2_PRELUDE;
use crate::io_error::{IoError, io};
use crate::kernel::Kernel;
use crate::l2::{self, L2Boot, L2Outcome};

/// The modules of the block-device guest: virtio-pci and virtio-blk, plus pvpanic so that a
/// panic ends the VM with a status rather than a hang.
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "pvpanic", "pvpanic-mmio"];

/// The sector the guest writes its marker to (byte offset [`MARKER_OFFSET`]).
pub const MARKER_SECTOR: u64 = 8;
/// The byte offset of the marker in the image.
pub const MARKER_OFFSET: u64 = MARKER_SECTOR * 512;

/// The guest's `/init` body after [`L2_PRELUDE`]. Reports, for each `/dev/vdX`,
/// `VDX_SIZE` (512-byte sectors), `VDX_RO`, `VDX_QUEUES` (entries of `/sys/block/vdX/mq`),
/// `VDX_SERIAL` and `VDX_MD5`, all before any write; then for each disk in
/// `testbed.write=vda,vdb` writes `atoll-blk:<disk>:<testbed.nonce>` at sector 8 with
/// `dd conv=fsync` and reports `VDX_WRITE` (`ok` or `failed: <dd's message>`) and
/// `VDX_READBACK` (what is at that place after dropping the disk's page cache: the marker, or
/// `other bytes: <hex>`).
const GUEST_BODY: &str = r#"
disks=
for dev in /sys/block/vd*; do
    [ -e "$dev" ] || continue
    d=${dev##*/}
    D=$(echo "$d" | tr a-z A-Z)
    disks="$disks $d"
    fact "${D}_SIZE" "$(cat "$dev/size")"
    fact "${D}_RO" "$(cat "$dev/ro")"
    fact "${D}_QUEUES" "$(ls "$dev/mq" | wc -l)"
    fact "${D}_SERIAL" "$(cat "$dev/serial" 2>/dev/null)"
    fact "${D}_MD5" "$(md5sum "/dev/$d" | cut -d' ' -f1)"
done
fact DISKS "${disks# }"
nonce=$(cmdline_arg nonce)
for d in $(cmdline_arg write | tr , ' '); do
    D=$(echo "$d" | tr a-z A-Z)
    marker="atoll-blk:$d:$nonce"
    printf '%s' "$marker" >"/tmp/marker-$d"
    if msg=$(dd if="/tmp/marker-$d" of="/dev/$d" bs=512 seek=8 conv=notrunc,fsync 2>&1); then
        fact "${D}_WRITE" ok
    else
        fact "${D}_WRITE" "failed: $(echo "$msg" | tr '\n' ' ')"
    fi
    blockdev --flushbufs "/dev/$d"
    dd if="/dev/$d" bs=512 skip=8 count=1 2>/dev/null | head -c ${#marker} >"/tmp/readback-$d"
    if cmp -s "/tmp/marker-$d" "/tmp/readback-$d"; then
        fact "${D}_READBACK" "$marker"
    else
        fact "${D}_READBACK" "other bytes: $(od -An -tx1 "/tmp/readback-$d" | tr -d ' \n')"
    fi
done
finish
"#;

/// The block-device guest's whole `/init`.
pub fn guest_init() -> String {
    format!("{L2_PRELUDE}{GUEST_BODY}")
}

/// The marker the guest writes to `disk` for `nonce`.
pub fn marker(disk: &str, nonce: &str) -> String {
    format!("atoll-blk:{disk}:{nonce}")
}

/// A token that differs between runs, for markers: seconds and nanoseconds since the epoch
/// and the process id, in hex.
pub fn nonce() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{:x}{:08x}{:x}",
        now.as_secs(),
        now.subsec_nanos(),
        std::process::id()
    )
}

/// The kernel command line of the block-device guest: write markers to `write` (e.g.
/// `["vda"]`), tagged with `nonce`.
pub fn guest_cmdline(write: &[&str], nonce: &str) -> String {
    let mut cmdline = format!("console=ttyS0 testbed.nonce={nonce}");
    if !write.is_empty() {
        let _ = write!(cmdline, " testbed.write={}", write.join(","));
    }
    cmdline
}

/// The fact `<DISK>_<key>` of a block-device guest (`disk_fact(o, "vda", "MD5")`).
pub fn disk_fact<'a>(outcome: &'a L2Outcome, disk: &str, key: &str) -> Option<&'a str> {
    outcome.fact(&format!("{}_{key}", disk.to_ascii_uppercase()))
}

/// Errors of [`TestImage`].
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Command(#[from] CmdError),
    #[error("`md5sum {path}` printed {output:?}, not a digest")]
    Md5Output { path: PathBuf, output: String },
}

/// A raw disk image of random bytes that remembers its original contents.
#[derive(Debug)]
pub struct TestImage {
    pub path: PathBuf,
    /// The contents as created.
    pub original: Vec<u8>,
    /// `md5sum` of the file as created, computed on the host.
    pub md5: String,
}

impl TestImage {
    /// Writes `size` pseudo-random bytes (a fresh sequence each run) to `path`.
    pub fn create(path: &Path, size: usize) -> Result<Self, ImageError> {
        let mut state = seed(path);
        let mut original = Vec::with_capacity(size + 8);
        while original.len() < size {
            // xorshift64*: plenty for test data that must merely differ between disks and runs.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            original.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        original.truncate(size);
        std::fs::write(path, &original).map_err(io("writing", path))?;
        let pristine = Self::pristine_path(path);
        std::fs::write(&pristine, &original).map_err(io("writing", &pristine))?;
        let md5 = md5sum(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            original,
            md5,
        })
    }

    /// Where a copy of the original contents is kept (`<image>.orig`).
    fn pristine_path(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".orig");
        PathBuf::from(p)
    }

    /// A shell line that puts the original contents back. An L1 session that is retried
    /// (TCG's rare freeze or panic) runs its script again; without this the second attempt
    /// would see what the first attempt's guest wrote.
    pub fn restore_line(&self) -> String {
        format!(
            "cp -f {} {}\n",
            shell_quote(&Self::pristine_path(&self.path).to_string_lossy()),
            shell_quote(&self.path.to_string_lossy())
        )
    }

    /// The image's contents now.
    pub fn current(&self) -> Result<Vec<u8>, ImageError> {
        Ok(std::fs::read(&self.path).map_err(io("reading", &self.path))?)
    }

    /// Whether the image is now its original contents with exactly `marker` written at
    /// `offset`; `Err` describes how it differs.
    pub fn check_written(&self, marker: &[u8], offset: u64) -> Result<(), String> {
        let mut expected = self.original.clone();
        let place = usize::try_from(offset)
            .ok()
            .and_then(|start| expected.get_mut(start..start.checked_add(marker.len())?))
            .ok_or_else(|| {
                format!(
                    "a {}-byte marker at offset {offset} does not fit in {}",
                    marker.len(),
                    self.path.display()
                )
            })?;
        place.copy_from_slice(marker);
        self.compare(&expected)
    }

    /// Whether the image still has its original contents; `Err` describes how it differs.
    pub fn check_unchanged(&self) -> Result<(), String> {
        self.compare(&self.original)
    }

    fn compare(&self, expected: &[u8]) -> Result<(), String> {
        let now = self.current().map_err(|e| e.to_string())?;
        describe_difference(expected, &now)
            .map_or(Ok(()), |how| Err(format!("{}: {how}", self.path.display())))
    }
}

/// How `actual` differs from `expected`, or `None` when they are equal.
pub fn describe_difference(expected: &[u8], actual: &[u8]) -> Option<String> {
    if expected == actual {
        return None;
    }
    if expected.len() != actual.len() {
        return Some(format!(
            "{} bytes instead of {}",
            actual.len(),
            expected.len()
        ));
    }
    let differing: Vec<usize> = (0..expected.len())
        .filter(|&i| expected[i] != actual[i])
        .collect();
    let first = differing[0];
    let last = differing[differing.len() - 1];
    let show =
        |bytes: &[u8]| String::from_utf8_lossy(&bytes[first..=last.min(first + 39)]).into_owned();
    Some(format!(
        "{} bytes differ between offsets {first} and {last}; from {first} it holds {:?} \
         where {:?} was expected",
        differing.len(),
        show(actual),
        show(expected)
    ))
}

/// A seed from the clock, the process and the path.
fn seed(path: &Path) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut seed = now.as_secs() ^ u64::from(now.subsec_nanos()).rotate_left(32);
    seed ^= u64::from(std::process::id()).rotate_left(17);
    for byte in path.as_os_str().as_encoded_bytes() {
        seed = (seed ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    seed | 1
}

/// `md5sum` of a file, run on this machine.
pub fn md5sum(path: &Path) -> Result<String, ImageError> {
    let out = TimedCommand::new("md5sum", Duration::from_secs(60))
        .arg(path)
        .output_ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .next()
        .filter(|d| d.len() == 32 && d.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .ok_or(ImageError::Md5Output {
            path: path.to_path_buf(),
            output: text,
        })
}

/// A qemu-storage-daemon `vhost-user-blk` export of a raw image, started before a boot and
/// stopped (SIGTERM) after it.
#[derive(Clone, Debug)]
pub struct QsdExport {
    pub image: PathBuf,
    /// Where the export listens. In L1 the work directory is a 9p share, so use a local path
    /// such as `/tmp/...`.
    pub socket: PathBuf,
}

impl QsdExport {
    /// The qemu-storage-daemon command line.
    pub fn command(&self) -> Vec<String> {
        vec![
            "qemu-storage-daemon".to_owned(),
            "--blockdev".to_owned(),
            format!(
                "driver=file,node-name=d,filename={}",
                qemu_escape(&self.image.to_string_lossy())
            ),
            "--export".to_owned(),
            format!(
                "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on",
                qemu_escape(&self.socket.to_string_lossy())
            ),
        ]
    }
}

/// QEMU's option syntax doubles a comma inside a value.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// One boot of the block-device guest under atoll.
#[derive(Clone, Debug)]
pub struct AtollDiskBoot {
    /// `boot` describes the guest (its `vmm` must be [`crate::l2::Vmm::Atoll`]); its name names the log
    /// files, as in [`crate::l2::boots_script`].
    pub boot: L2Boot,
    /// `--disk` values, in order.
    pub disks: Vec<String>,
    /// An external backend to start first.
    pub qsd: Option<QsdExport>,
}

impl AtollDiskBoot {
    /// The atoll command line: [`L2Boot::command`] plus the disks.
    pub fn command(&self, kernel: &Kernel, atoll: &Path) -> Vec<String> {
        let mut cmd = self.boot.command(kernel, atoll);
        for disk in &self.disks {
            cmd.push("--disk".to_owned());
            cmd.push(disk.clone());
        }
        cmd
    }

    /// What the boot left behind in `out`.
    pub fn outcome(&self, out: &Path) -> L2Outcome {
        L2Outcome::read(&self.boot, out)
    }
}

/// Files a qemu-storage-daemon export leaves in the output directory: its output, and how it
/// ended (`started-no-socket`, or the exit status after SIGTERM).
pub fn qsd_log(out: &Path, boot: &str) -> PathBuf {
    out.join(format!("{boot}.qsd.log"))
}

/// See [`qsd_log`].
pub fn qsd_status(out: &Path, boot: &str) -> PathBuf {
    out.join(format!("{boot}.qsd.status"))
}

/// A POSIX shell script that first restores `images` to their original contents, then runs
/// `boots` one after another like [`crate::l2::boots_script`] (`<out>/<name>.log` and `<out>/<name>.rc`), starting each
/// boot's qemu-storage-daemon export first and stopping it afterwards ([`qsd_log`],
/// [`qsd_status`]).
pub fn boots_script(
    boots: &[AtollDiskBoot],
    images: &[&TestImage],
    kernel: &Kernel,
    atoll: &Path,
    out: &Path,
) -> String {
    let mut script = l2::script_start(out);
    for image in images {
        script.push_str(&image.restore_line());
    }
    script.push_str(QSD_FUNCTIONS);
    for disk_boot in boots {
        let run = l2::run_command_line(&disk_boot.boot, &disk_boot.command(kernel, atoll));
        match &disk_boot.qsd {
            None => script.push_str(&run),
            Some(qsd) => {
                let name = shell_quote(&disk_boot.boot.name);
                let qsd_command: Vec<String> =
                    qsd.command().iter().map(|a| shell_quote(a)).collect();
                let _ = write!(
                    script,
                    "if start_qsd {name} {} {}; then\n    {run}    stop_qsd {name}\nfi\n",
                    shell_quote(&qsd.socket.to_string_lossy()),
                    qsd_command.join(" ")
                );
            }
        }
    }
    script.push_str(l2::SCRIPT_END);
    script
}

/// Shell functions [`boots_script`] adds to [`l2::script_start`]: `start_qsd NAME SOCKET
/// COMMAND...` starts an export in the background (output to `$tmp`) and waits up to 30 s for
/// its socket, failing with `started-no-socket` in [`qsd_status`] when none appears;
/// `stop_qsd NAME` sends it SIGTERM, waits and records its exit status. Both copy the export's
/// output to [`qsd_log`].
const QSD_FUNCTIONS: &str = r#"qsd=
start_qsd() {
    name=$1
    sock=$2
    shift 2
    rm -f "$sock"
    "$@" >"$tmp/$name.qsd.log" 2>&1 &
    qsd=$!
    i=0
    while [ ! -S "$sock" ] && [ $i -lt 300 ] && kill -0 $qsd 2>/dev/null; do
        sleep 0.1
        i=$((i + 1))
    done
    if [ ! -S "$sock" ]; then
        echo started-no-socket >"$out/$name.qsd.status"
        cp "$tmp/$name.qsd.log" "$out/$name.qsd.log"
        return 1
    fi
    echo "TESTBED_QSD $name pid $qsd listens on $sock"
}
stop_qsd() {
    name=$1
    kill -TERM $qsd
    wait $qsd
    echo "exit $?" >"$out/$name.qsd.status"
    cp "$tmp/$name.qsd.log" "$out/$name.qsd.log"
    qsd=
}
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l2::Vmm;

    fn kernel() -> Kernel {
        Kernel {
            package: "linux-image-x".into(),
            release: "x".into(),
            vmlinuz: "/k/vmlinuz-x".into(),
            modules_dir: "/k/lib/modules/x".into(),
        }
    }

    fn boot(name: &str) -> L2Boot {
        L2Boot {
            name: name.into(),
            vmm: Vmm::Atoll,
            cpus: 2,
            memory_mib: 512,
            cmdline: guest_cmdline(&["vda", "vdb"], "n1"),
            initramfs: "/w/blk.cpio".into(),
            timeout: Duration::from_secs(200),
        }
    }

    #[test]
    fn cmdline_names_the_disks_to_write() {
        assert_eq!(
            guest_cmdline(&["vda", "vdb"], "n1"),
            "console=ttyS0 testbed.nonce=n1 testbed.write=vda,vdb"
        );
        assert_eq!(guest_cmdline(&[], "n1"), "console=ttyS0 testbed.nonce=n1");
        assert_eq!(marker("vdb", "n1"), "atoll-blk:vdb:n1");
        assert_ne!(nonce(), "");
    }

    #[test]
    fn atoll_command_appends_the_disks() {
        let b = AtollDiskBoot {
            boot: boot("two"),
            disks: vec!["path=/w/a.img".into(), "path=/w/b.img,readonly=on".into()],
            qsd: None,
        };
        let cmd = b.command(&kernel(), Path::new("/t/atoll"));
        assert_eq!(cmd[0], "/t/atoll");
        assert_eq!(
            cmd[cmd.len() - 4..],
            [
                "--disk",
                "path=/w/a.img",
                "--disk",
                "path=/w/b.img,readonly=on"
            ]
        );
        assert!(cmd.windows(2).any(|w| w == ["--cpus", "2"]));
    }

    #[test]
    fn script_starts_and_stops_the_export_around_its_boot() {
        let plain = AtollDiskBoot {
            boot: boot("plain"),
            disks: vec!["path=/w/a.img".into()],
            qsd: None,
        };
        let external = AtollDiskBoot {
            boot: boot("ext"),
            disks: vec!["socket=/tmp/q.sock".into()],
            qsd: Some(QsdExport {
                image: "/w/q,1.img".into(),
                socket: "/tmp/q.sock".into(),
            }),
        };
        let dir = std::env::temp_dir().join(format!("atoll-blk-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = TestImage::create(&dir.join("a.img"), 4096).unwrap();
        let script = boots_script(
            &[plain, external],
            &[&image],
            &kernel(),
            Path::new("/t/atoll"),
            Path::new("/w/out"),
        );
        // A retried L1 session starts again from the original image.
        let restore = format!(
            "cp -f {}.orig {}\n",
            image.path.display(),
            image.path.display()
        );
        assert!(script.contains(&restore), "{script}");
        assert!(
            script.find(&restore) < script.find("run_boot plain"),
            "{script}"
        );
        assert_eq!(
            std::fs::read(dir.join("a.img.orig")).unwrap(),
            image.original
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            script.contains("\nrun_boot plain 200 /t/atoll run "),
            "{script}"
        );
        assert!(script.contains("--disk path=/w/a.img\n"), "{script}");
        assert!(
            script.contains(
                "if start_qsd ext /tmp/q.sock qemu-storage-daemon --blockdev \
                 driver=file,node-name=d,filename=/w/q,,1.img --export \
                 type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=/tmp/q.sock,\
                 writable=on; then\n    run_boot ext 200 "
            ),
            "{script}"
        );
        assert!(
            script.contains("--disk socket=/tmp/q.sock\n    stop_qsd ext\nfi\n"),
            "{script}"
        );
    }

    #[test]
    fn images_remember_their_contents_and_spot_changes() {
        let dir = std::env::temp_dir().join(format!("atoll-blk-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = TestImage::create(&dir.join("a.img"), 64 << 10).unwrap();
        let b = TestImage::create(&dir.join("b.img"), 64 << 10).unwrap();
        assert_ne!(a.original, b.original, "two images got the same bytes");
        assert_ne!(a.md5, b.md5);
        assert_eq!(a.current().unwrap(), a.original);
        assert!(a.check_unchanged().is_ok());
        assert!(a.check_written(b"xyz", MARKER_OFFSET).is_err());
        let mut now = a.original.clone();
        now[4096..4099].copy_from_slice(b"xyz");
        std::fs::write(&a.path, &now).unwrap();
        assert!(a.check_written(b"xyz", MARKER_OFFSET).is_ok());
        let err = a.check_unchanged().unwrap_err();
        assert!(err.contains("differ between offsets 4096 and"), "{err}");
        assert!(a.check_written(b"xyw", MARKER_OFFSET).is_err());
        now[60_000] ^= 1;
        std::fs::write(&a.path, &now).unwrap();
        let err = a.check_written(b"xyz", MARKER_OFFSET).unwrap_err();
        assert!(
            err.contains("1 bytes differ between offsets 60000 and 60000"),
            "{err}"
        );
        std::fs::write(&a.path, &now[..100]).unwrap();
        assert!(
            a.check_unchanged()
                .unwrap_err()
                .contains("100 bytes instead of 65536")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn md5_of_a_known_file() {
        let path = std::env::temp_dir().join(format!("atoll-blk-md5-{}", std::process::id()));
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(md5sum(&path).unwrap(), "900150983cd24fb0d6963f7d28e17f72");
        std::fs::remove_file(&path).unwrap();
    }
}
