//! `testbed`: the nested-KVM testbed by hand (see `README.md` and `TESTBED.md`).
//!
//! - `testbed boot [--vmm atoll|qemu|both] [--cpus N] [--memory MIB] [--cmdline STR] [--action A]`
//!   boots the standard facts guest once (in L1 unless the host's KVM is real) and prints its
//!   console, exit status and facts;
//! - `testbed l1 SCRIPT` runs a shell script inside L1 with `$ATOLL`, `$TESTBED_KERNEL` and
//!   `$TESTBED_INITRAMFS` set;
//! - `testbed demo` boots the demo guest with a shell on the serial console;
//! - `testbed kernel` and `testbed initramfs` fetch the kernel and build an L2 initramfs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use atoll_tests::cmd::{TimedCommand, shell_quote};
use atoll_tests::host::{HostKvm, Placement};
use atoll_tests::l2::{L2Boot, Vmm};
use atoll_tests::{Testbed, initramfs, paths};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(about = "atoll's nested-KVM testbed: boot L2 test guests under atoll or QEMU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum VmmChoice {
    Atoll,
    Qemu,
    /// QEMU first, then atoll, in one L1 session; prints how their facts differ.
    Both,
}

#[derive(Clone, Copy, ValueEnum)]
enum Action {
    Poweroff,
    Reboot,
    Panic,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch (once) the Debian kernel and print where it is.
    Kernel,
    /// Build an L2 initramfs: the facts guest, the demo guest, or your own /init.
    Initramfs {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Modules to include with their dependencies (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = initramfs::L2_FACT_MODULES.iter().map(|s| (*s).to_owned()))]
        modules: Vec<String>,
        /// An /init script to use instead of the facts guest's (it may source nothing: the
        /// prelude is prepended, so `fact`, `standard_facts` and `finish` are defined).
        #[arg(long, conflicts_with = "demo")]
        init: Option<PathBuf>,
        /// The demo guest (banner, facts, shell with testbed.action=shell).
        #[arg(long)]
        demo: bool,
    },
    /// Boot the facts guest once and print its console, exit status and facts.
    Boot {
        #[arg(long, value_enum, default_value = "atoll")]
        vmm: VmmChoice,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Guest kernel command line.
        #[arg(long, default_value = "console=ttyS0")]
        cmdline: String,
        /// Appends `testbed.action=<action>` to the command line.
        #[arg(long, value_enum)]
        action: Option<Action>,
        /// Another initramfs instead of the facts guest.
        #[arg(long)]
        initramfs: Option<PathBuf>,
        /// Limit for the boot, in seconds.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Run a shell script inside L1 (directly on a host with real KVM). The script sees
    /// $ATOLL, $TESTBED_KERNEL, $TESTBED_INITRAMFS (the facts guest) and $TESTBED_WORK
    /// (its writable work directory, also the current directory); its exit status is ours.
    L1 {
        script: PathBuf,
        /// Put L1's console on this terminal (quit QEMU with Ctrl-A X).
        #[arg(long)]
        interactive: bool,
        /// Limit for the whole L1 run, in seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// Boot the demo guest (busybox shell on the serial console) under atoll, in L1 when this
    /// host's KVM cannot boot Linux.
    Demo {
        #[arg(long, value_enum, default_value = "atoll")]
        vmm: DemoVmm,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DemoVmm {
    Atoll,
    Qemu,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("testbed: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Kernel => {
            let testbed = Testbed::setup()?;
            let k = &testbed.kernel;
            println!("package={}\nrelease={}", k.package, k.release);
            println!(
                "vmlinuz={}\nmodules={}",
                k.vmlinuz.display(),
                k.modules_dir.display()
            );
            println!(
                "host_kvm={:?} placement={:?}",
                testbed.host, testbed.placement
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Initramfs {
            out,
            modules,
            init,
            demo,
        } => {
            let testbed = Testbed::setup()?;
            let init = match (init, demo) {
                (Some(path), _) => {
                    let body = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    format!("{}\n{body}", initramfs::L2_PRELUDE)
                }
                (None, true) => initramfs::l2_demo_init(),
                (None, false) => initramfs::l2_facts_init(),
            };
            let modules: Vec<&str> = modules.iter().map(String::as_str).collect();
            testbed.write_l2_initramfs(&out, &modules, &init)?;
            println!("{}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Boot {
            vmm,
            cpus,
            memory,
            cmdline,
            action,
            initramfs,
            timeout,
        } => boot(vmm, cpus, memory, cmdline, action, initramfs, timeout),
        Command::L1 {
            script,
            interactive,
            timeout,
        } => l1(&script, interactive, Duration::from_secs(timeout)),
        Command::Demo { vmm } => demo(vmm),
    }
}

fn require_atoll() -> Result<PathBuf> {
    let atoll = paths::release_bin("atoll");
    if !atoll.is_file() {
        bail!(
            "{} does not exist: build it first with `cargo build --release`",
            atoll.display()
        );
    }
    Ok(atoll)
}

fn boot(
    vmm: VmmChoice,
    cpus: u32,
    memory_mib: u32,
    mut cmdline: String,
    action: Option<Action>,
    initramfs: Option<PathBuf>,
    timeout: u64,
) -> Result<ExitCode> {
    let vmms: &[Vmm] = match vmm {
        VmmChoice::Atoll => &[Vmm::Atoll],
        VmmChoice::Qemu => &[Vmm::Qemu],
        VmmChoice::Both => &[Vmm::Qemu, Vmm::Atoll],
    };
    if vmms.contains(&Vmm::Atoll) {
        require_atoll()?;
    }
    if let Some(action) = action {
        let name = match action {
            Action::Poweroff => "poweroff",
            Action::Reboot => "reboot",
            Action::Panic => "panic",
        };
        cmdline.push_str(&format!(" testbed.action={name}"));
    }
    let testbed = Testbed::setup()?;
    let work = testbed.work_dir("boot")?;
    let initramfs = match initramfs {
        Some(path) => {
            std::fs::canonicalize(&path).with_context(|| format!("resolving {}", path.display()))?
        }
        None => testbed.facts_initramfs(&work)?,
    };
    let boots: Vec<L2Boot> = vmms
        .iter()
        .map(|&vmm| L2Boot {
            name: vmm.name().to_owned(),
            vmm,
            cpus,
            memory_mib,
            cmdline: cmdline.clone(),
            initramfs: initramfs.clone(),
            timeout: Duration::from_secs(timeout),
        })
        .collect();
    eprintln!(
        "testbed: booting {} L2 guest(s) {}; work directory {}",
        boots.len(),
        match testbed.placement {
            Placement::L1 => "inside L1 (QEMU-TCG, nested SVM)",
            Placement::Direct => "directly on this host's KVM",
        },
        work.display()
    );
    let outcomes = testbed.run_l2_boots(&work, &boots)?;
    for outcome in &outcomes {
        println!(
            "===== {} console ({}) =====",
            outcome.boot.name,
            outcome.log.display()
        );
        print!("{}", outcome.console);
        println!("===== {} =====", outcome.boot.name);
        println!("status: {:?}", outcome.status);
        println!("ended: {:?}", outcome.guest_end());
        for (key, value) in &outcome.facts {
            println!("{key}={value}");
        }
    }
    if let [qemu, atoll] = outcomes.as_slice() {
        println!("===== facts that differ (qemu | atoll) =====");
        let keys: std::collections::BTreeSet<_> =
            qemu.facts.keys().chain(atoll.facts.keys()).collect();
        for key in keys {
            let (q, a) = (qemu.fact(key), atoll.fact(key));
            if q != a {
                println!("{key}: {q:?} | {a:?}");
            }
        }
    }
    let last = outcomes.last().and_then(|o| o.status).unwrap_or(1);
    Ok(ExitCode::from(u8::try_from(last).unwrap_or(1)))
}

fn l1(script: &Path, interactive: bool, timeout: Duration) -> Result<ExitCode> {
    let body =
        std::fs::read_to_string(script).with_context(|| format!("reading {}", script.display()))?;
    let testbed = Testbed::setup()?;
    let work = testbed.work_dir("l1")?;
    let user_script = work.join("user-script.sh");
    std::fs::write(&user_script, body)
        .with_context(|| format!("writing {}", user_script.display()))?;
    let initramfs = testbed.facts_initramfs(&work)?;
    let wrapper = format!(
        "export ATOLL={} TESTBED_KERNEL={} TESTBED_INITRAMFS={}\nexec sh {}\n",
        shell_quote(&paths::release_bin("atoll").to_string_lossy()),
        shell_quote(&testbed.kernel.vmlinuz.to_string_lossy()),
        shell_quote(&initramfs.to_string_lossy()),
        shell_quote(&user_script.to_string_lossy()),
    );
    eprintln!(
        "testbed: running {} {}; work directory {}",
        script.display(),
        match testbed.placement {
            Placement::L1 => "inside L1 (QEMU-TCG with nested SVM)",
            Placement::Direct => "directly on this host",
        },
        work.display()
    );
    let run = testbed.run_script(&work, &wrapper, timeout, interactive)?;
    if !interactive {
        let log = work.join(atoll_tests::l1::SCRIPT_LOG);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        print!("{text}");
    }
    eprintln!(
        "testbed: the script exited with status {} (logs in {})",
        run.status,
        work.display()
    );
    Ok(ExitCode::from(u8::try_from(run.status).unwrap_or(1)))
}

fn demo(vmm: DemoVmm) -> Result<ExitCode> {
    let testbed = Testbed::setup()?;
    let work = testbed.work_dir("demo")?;
    let image = work.join("demo-initramfs.cpio");
    testbed.write_l2_initramfs(
        &image,
        initramfs::L2_FACT_MODULES,
        &initramfs::l2_demo_init(),
    )?;
    let guest = L2Boot {
        name: "demo".into(),
        vmm: match vmm {
            DemoVmm::Atoll => Vmm::Atoll,
            DemoVmm::Qemu => Vmm::Qemu,
        },
        cpus: 2,
        memory_mib: 512,
        cmdline: "console=ttyS0 quiet testbed.action=shell".into(),
        initramfs: image,
        timeout: Duration::from_secs(24 * 3600),
    };
    let atoll = if guest.vmm == Vmm::Atoll {
        require_atoll()?
    } else {
        paths::release_bin("atoll")
    };
    let command = guest.command(&testbed.kernel, &atoll);
    match testbed.placement {
        Placement::Direct => {
            eprintln!(
                "demo: booting the demo guest under {} on this host's KVM",
                guest.vmm.name()
            );
            let (program, args) = command.split_first().context("empty VMM command")?;
            let status = TimedCommand::foreground(program, guest.timeout)
                .args(args)
                .status()?;
            Ok(ExitCode::from(
                u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
            ))
        }
        Placement::L1 => {
            let why = match testbed.host {
                HostKvm::Pvm => "this machine's /dev/kvm is kvm_pvm, which cannot boot Linux",
                HostKvm::Missing => "this machine has no /dev/kvm",
                HostKvm::Real => "ATOLL_TESTBED=l1 asks for it",
            };
            eprintln!(
                "demo: {why}, so the demo runs INSIDE THE L1 TESTBED: QEMU (TCG, emulated SVM \
                 CPU) boots a Linux L1 guest whose own KVM runs {} with the demo guest. Expect \
                 about 5 s for L1 and 10-20 s for the guest to boot. Its console is this \
                 terminal; quit QEMU with Ctrl-A X.",
                guest.vmm.name()
            );
            let line: Vec<String> = command.iter().map(|a| shell_quote(a)).collect();
            let script = format!(
                "echo 'L1 is up; starting: {}'\n{}\n",
                guest.vmm.name(),
                line.join(" ")
            );
            let run = testbed.run_script(&work, &script, guest.timeout, true)?;
            Ok(ExitCode::from(u8::try_from(run.status).unwrap_or(1)))
        }
    }
}
