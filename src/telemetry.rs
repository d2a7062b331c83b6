//! Log setup: `tracing` to stderr, human text or JSON (one object per line, for CloudWatch and
//! other collectors), level from `KEYPROXY_LOG` or `RUST_LOG` (default `info`).
//!
//! Third-party crates (hyper, h2, rustls, the AWS SDK) are capped at `info` unless the filter names
//! them: at `trace` they would print wire-level detail, and nothing that could hold a key may
//! reach a log line. The AWS credential chain's per-provider warnings are capped at `error`: a
//! missing credential is reported once, by the cache, as `no_credentials` with what to set.
//!
//! Text is coloured only when stderr is a terminal and `NO_COLOR` is unset or empty
//! (<https://no-color.org>): a log file or a collector gets plain text. A field named `*_ms` (a
//! duration in milliseconds, such as the access log's `latency_ms`) is written rounded to the
//! microsecond, in both formats: `latency_ms=1.002`, not `1.0022469999999999`.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "text" | "plain" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format: use text or json")),
        }
    }
}

/// Crates whose verbose levels could show wire data (STS answers carry role credentials).
const CAPPED: &[&str] = &[
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
    "tower",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http_client",
    "aws_smithy_http",
    "aws_config",
    "aws_sdk_secretsmanager",
    "aws_sdk_sts",
    "aws_runtime",
    "lambda_runtime",
    "lambda_runtime_api_client",
];

/// Targets held to `error` unless the filter names them (or a crate above them): the credential
/// chain warns once per provider tried, with the SDK's whole error (IMDS tokens, HTTP bodies);
/// the cache's own line says what is missing instead.
const QUIET: &[&str] = &["aws_config::meta::credentials::chain"];

/// Whether the filter `spec` has a directive for `target` itself or a module above it.
fn names(spec: &str, target: &str) -> bool {
    spec.split(',').map(str::trim).any(|d| {
        let name = d.split(['=', '[']).next().unwrap_or_default();
        !name.is_empty()
            && target.starts_with(name)
            && (target.len() == name.len() || target[name.len()..].starts_with("::"))
    })
}

/// The filter directives for `spec` (e.g. `debug`, `keyproxy=trace`), with the caps added.
pub fn directives(spec: &str) -> String {
    let mut out = spec.trim().to_owned();
    if out.is_empty() {
        out.push_str("info");
    }
    for c in CAPPED {
        if !names(spec, c) {
            out.push_str(&format!(",{c}=info"));
        }
    }
    for q in QUIET {
        if !names(spec, q) {
            out.push_str(&format!(",{q}=error"));
        }
    }
    out
}

/// Whether text logs get colour: only on a terminal, and not when `NO_COLOR` is set to anything
/// but the empty string.
pub fn use_color(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber on stderr. `spec`: a filter such as `info` or `keyproxy=debug`.
pub fn init(spec: &str, format: LogFormat) -> Result<(), String> {
    let color = use_color(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    tracing_log::LogTracer::init().map_err(|e| e.to_string())?;
    tracing::subscriber::set_global_default(subscriber(spec, format, color, std::io::stderr)?)
        .map_err(|e| e.to_string())
}

/// The subscriber [`init`] installs, writing to `writer` (tests pass a buffer).
pub fn subscriber<W>(
    spec: &str,
    format: LogFormat,
    color: bool,
    writer: W,
) -> Result<Box<dyn Subscriber + Send + Sync>, String>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_new(directives(spec)).map_err(|e| format!("log filter {spec:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    Ok(match format {
        LogFormat::Text => Box::new(builder.with_ansi(color).fmt_fields(RoundedFields).finish()),
        LogFormat::Json => Box::new(builder.event_format(JsonLines).finish()),
    })
}

/// `value` rounded to 3 decimals when `field` is a duration in milliseconds (`*_ms`).
fn rounded(field: &Field, value: f64) -> f64 {
    if field.name().ends_with("_ms") {
        (value * 1000.0).round() / 1000.0
    } else {
        value
    }
}

/// The text format's fields: tracing-subscriber's own, with `*_ms` values rounded.
struct RoundedFields;

impl<'a> MakeVisitor<Writer<'a>> for RoundedFields {
    type Visitor = Rounding<DefaultVisitor<'a>>;

    fn make_visitor(&self, target: Writer<'a>) -> Self::Visitor {
        Rounding(DefaultVisitor::new(target, true))
    }
}

/// A field visitor that passes every field on, `*_ms` floats rounded.
struct Rounding<V>(V);

impl<V: Visit> Visit for Rounding<V> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.record_f64(field, rounded(field, value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.record_i64(field, value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.record_u64(field, value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.record_bool(field, value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.record_str(field, value);
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.record_error(field, value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.record_debug(field, value);
    }
}

impl<V: VisitOutput<fmt::Result>> VisitOutput<fmt::Result> for Rounding<V> {
    fn finish(self) -> fmt::Result {
        self.0.finish()
    }
}

impl<V: VisitFmt> VisitFmt for Rounding<V> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        self.0.writer()
    }
}

/// The JSON format: one object per line, `{"timestamp", "level", <fields>, "target"}` (the
/// event's fields flattened, as tracing-subscriber's `json().flatten_event(true)` writes them),
/// with `*_ms` values rounded.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut line = JsonObject(Vec::with_capacity(256));
        line.entry("timestamp", &timestamp);
        line.entry("level", meta.level().as_str());
        event.record(&mut line);
        line.entry("target", meta.target());
        line.0.push(b'}');
        writeln!(writer, "{}", String::from_utf8_lossy(&line.0))
    }
}

/// A JSON object being written: `{` and the entries so far.
struct JsonObject(Vec<u8>);

impl JsonObject {
    fn entry<T: serde::Serialize + ?Sized>(&mut self, key: &str, value: &T) {
        self.0.push(if self.0.is_empty() { b'{' } else { b',' });
        // Writing a string or a number into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.0, key);
        self.0.push(b':');
        let _ = serde_json::to_writer(&mut self.0, value);
    }
}

impl Visit for JsonObject {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field.name(), &rounded(field, value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field.name(), &value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field.name(), &value);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field.name(), &value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field.name(), value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // Bridged `log` records carry their metadata as `log.*` fields; it is in the line already.
        if !field.name().starts_with("log.") {
            self.entry(field.name(), &format!("{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn third_party_crates_are_capped_unless_named() {
        let d = directives("trace");
        assert!(d.starts_with("trace,"));
        assert!(d.contains(",hyper=info") && d.contains(",h2=info"));
        assert!(d.contains(",aws_config::meta::credentials::chain=error"));
        let d = directives("trace,h2=trace");
        assert!(!d.contains(",h2=info"));
        assert!(d.contains(",hyper=info"));
        // hyper_util is not hyper.
        assert!(directives("hyper=debug").contains(",hyper_util=info"));
        let d = directives("aws_config=debug");
        assert!(
            !d.contains("aws_config=info") && !d.contains("chain=error"),
            "{d}"
        );
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_color(true, None));
        assert!(use_color(true, Some(OsStr::new(""))));
        assert!(!use_color(true, Some(OsStr::new("1"))));
        assert!(!use_color(false, None));
    }

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    /// What one access-log-like event looks like in `format`.
    fn logged(format: LogFormat, color: bool) -> String {
        let buf = Buffer::default();
        let sub = subscriber("info", format, color, buf.clone()).expect("subscriber");
        tracing::subscriber::with_default(sub, || {
            tracing::info!(target: "keyproxy::access", route = "a", status = 200u16,
                latency_ms = 1.002_246_999_999_999_9_f64, ratio = 0.123_456_f64, replayed = false);
        });
        let out = buf.0.lock().expect("buffer").clone();
        String::from_utf8(out).expect("utf8")
    }

    #[test]
    fn text_logs_round_milliseconds_and_colour_only_when_asked() {
        let plain = logged(LogFormat::Text, false);
        assert!(plain.contains("latency_ms=1.002 "), "{plain}");
        assert!(plain.contains("ratio=0.123456"), "{plain}");
        assert!(!plain.contains('\u{1b}'), "{plain}");
        assert!(logged(LogFormat::Text, true).contains('\u{1b}'));
    }

    #[test]
    fn json_logs_keep_their_shape_and_round_milliseconds() {
        let line = logged(LogFormat::Json, true);
        assert!(!line.contains('\u{1b}'));
        assert!(line.contains("\"latency_ms\":1.002,"), "{line}");
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON object");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "keyproxy::access");
        assert_eq!(v["route"], "a");
        assert_eq!(v["status"], 200);
        assert_eq!(v["replayed"], false);
        assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
