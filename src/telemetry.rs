//! Log setup: `tracing` to stderr, human text or JSON (one object per line, for CloudWatch and
//! other collectors), level from `KEYPROXY_LOG` or `RUST_LOG` (default `info`).
//!
//! Third-party crates (hyper, h2, rustls, the AWS SDK) are capped at `info` unless the filter names
//! them: at `trace` they would print wire-level detail, and nothing that could hold a key may
//! reach a log line.

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

/// Crates whose verbose levels could show wire data.
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
    "aws_runtime",
    "lambda_runtime",
    "lambda_runtime_api_client",
];

/// The filter directives for `spec` (e.g. `debug`, `keyproxy=trace`), with the caps added.
pub fn directives(spec: &str) -> String {
    let mut out = spec.trim().to_owned();
    if out.is_empty() {
        out.push_str("info");
    }
    for c in CAPPED {
        if !spec
            .split(',')
            .any(|d| d.trim().starts_with(c) && d.trim()[c.len()..].starts_with(['=', ':', '[']))
        {
            out.push_str(&format!(",{c}=info"));
        }
    }
    out
}

/// Installs the global subscriber. `spec`: a filter such as `info` or `keyproxy=debug`.
pub fn init(spec: &str, format: LogFormat) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(directives(spec)).map_err(|e| format!("log filter {spec:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn third_party_crates_are_capped_unless_named() {
        let d = directives("trace");
        assert!(d.starts_with("trace,"));
        assert!(d.contains(",hyper=info") && d.contains(",h2=info"));
        let d = directives("trace,h2=trace");
        assert!(!d.contains(",h2=info"));
        assert!(d.contains(",hyper=info"));
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
    }
}
