//! One logging setup for every atoll process: `tracing` to stderr, filtered by `ATOLL_LOG`
//! (an `EnvFilter` directive such as `info` or `vmm_core=debug`), every line labelled with the
//! process that wrote it. `ATOLL_LOG_FORMAT=json` switches to one JSON object per line with a
//! `"process"` field. The launcher's children inherit both variables.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The environment variable through which the launcher tells a device process its device id
/// (`disk0`, `net1`, ...), for its log label.
pub const DEVICE_ENV: &str = "ATOLL_DEVICE";

/// The label of this process's lines: the binary's name, and when the launcher started it
/// also its device id and its pid as the launcher and `ps` see it, e.g.
/// `dev-blk disk0 (pid 4242)`. That pid is read from `/proc/self`, which is still the host's
/// procfs when logging starts (before lockdown), so it is right even inside a new pid
/// namespace, where the process itself is pid 1.
fn process_label(binary: &str) -> String {
    let device = std::env::var(DEVICE_ENV).ok().filter(|d| !d.is_empty());
    let started_by_atoll = std::env::var_os(crate::sandbox::CONFINE_ENV).is_some();
    if device.is_none() && !started_by_atoll {
        return binary.to_owned();
    }
    let pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok())
        .unwrap_or_else(std::process::id);
    match device {
        Some(d) => format!("{binary} {d} (pid {pid})"),
        None => format!("{binary} (pid {pid})"),
    }
}

/// Installs the global subscriber for process `binary` (labelled as [`process_label`] says),
/// at `default_level` unless `ATOLL_LOG` says otherwise. Calling it twice is harmless (the
/// second call does nothing).
pub fn init(binary: &'static str, default_level: &str) {
    let label = process_label(binary);
    let filter =
        EnvFilter::try_from_env("ATOLL_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let json = std::env::var("ATOLL_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if json {
        builder
            .event_format(JsonLabelled {
                label: label.clone(),
                inner: tracing_subscriber::fmt::format().json(),
            })
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .event_format(Labelled {
                label,
                inner: tracing_subscriber::fmt::format().with_target(false),
            })
            .try_init()
    };
}

/// Puts `label: ` in front of another formatter's lines.
struct Labelled<F> {
    label: String,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for Labelled<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "{}: ", self.label)?;
        self.inner.format_event(ctx, writer, event)
    }
}

/// Adds `"process":"<label>"` as the first field of a JSON formatter's objects.
struct JsonLabelled<F> {
    label: String,
    inner: F,
}

impl<S, N, F> FormatEvent<S, N> for JsonLabelled<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"process\":\"{}\",{rest}", self.label),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[test]
    fn text_lines_carry_the_label() {
        let buf = Buf::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_ansi(false)
            .event_format(Labelled {
                label: "dev-blk".to_owned(),
                inner: tracing_subscriber::fmt::format(),
            })
            .finish();
        tracing::subscriber::with_default(sub, || tracing::warn!(queue = 1, "ring stalled"));
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(out.starts_with("dev-blk: "), "{out}");
        assert!(
            out.contains("ring stalled") && out.contains("queue=1"),
            "{out}"
        );
    }

    #[test]
    fn json_lines_carry_the_process_field() {
        let buf = Buf::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonLabelled {
                label: "vmm-core".to_owned(),
                inner: tracing_subscriber::fmt::format().json(),
            })
            .finish();
        tracing::subscriber::with_default(sub, || tracing::info!(gsi = 24, "route set"));
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(out.starts_with("{\"process\":\"vmm-core\",\""), "{out}");
        assert!(
            out.contains("\"gsi\":24") && out.contains("route set"),
            "{out}"
        );
    }
}
