//! One logging setup for every atoll process: `tracing` to stderr, filtered by `ATOLL_LOG`
//! (an `EnvFilter` directive such as `info` or `vmm_core=debug`), every line labelled with the
//! process that wrote it. `ATOLL_LOG_FORMAT=json` switches to one JSON object per line with a
//! `"process"` field. The launcher's children inherit both variables.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber for process `label`, at `default_level` unless `ATOLL_LOG`
/// says otherwise. Calling it twice is harmless (the second call does nothing).
pub fn init(label: &'static str, default_level: &str) {
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
                label,
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
    label: &'static str,
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
    label: &'static str,
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
                label: "dev-blk",
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
                label: "vmm-core",
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
