//! Where a route's key goes: a header (not one the proxy manages) or a query parameter, and the
//! value template around it.

use http::header::HeaderName;

use crate::config::{defaults, Problems};
use crate::inject::{Injection, Template};

/// Header names keyproxy must not be told to inject into.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

/// `header` or `query_param` (not both; neither: the default header) and `value`; `None` (with
/// a problem) when any of them is wrong. `k` names the route's keys.
pub(super) fn injection(
    header: Option<String>,
    query_param: Option<String>,
    value: Option<String>,
    k: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<Injection> {
    match (header, query_param) {
        (Some(_), Some(_)) => {
            problems.add(k("query_param"), "set header or query_param, not both");
            None
        }
        (h, None) => {
            let name = header_name(h.as_deref().unwrap_or(defaults::HEADER), k, problems);
            let template = template(value, defaults::HEADER_VALUE, k, problems);
            name.zip(template)
                .map(|(name, template)| Injection::Header { name, template })
        }
        (None, Some(param)) => {
            if param.is_empty() || param.contains(['&', '=', '#', ' ']) {
                problems.add(
                    k("query_param"),
                    format!("{param:?} is not a plain parameter name"),
                );
            }
            template(value, defaults::QUERY_VALUE, k, problems)
                .map(|template| Injection::Query { param, template })
        }
    }
}

/// `header`: a valid header name that is not in [`RESERVED_HEADERS`].
fn header_name(h: &str, k: &dyn Fn(&str) -> String, problems: &mut Problems) -> Option<HeaderName> {
    match h.parse::<HeaderName>() {
        Ok(n) if RESERVED_HEADERS.contains(&n.as_str()) => {
            problems.add(
                k("header"),
                format!("{h:?} is managed by the proxy and cannot carry a key"),
            );
            None
        }
        Ok(n) => Some(n),
        Err(_) => {
            problems.add(k("header"), format!("{h:?} is not a valid header name"));
            None
        }
    }
}

/// `value` (or `default`): a template with `{secret}` in it.
fn template(
    value: Option<String>,
    default: &str,
    k: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<Template> {
    let text = value.unwrap_or_else(|| default.into());
    Template::parse(&text)
        .map_err(|e| problems.add(k("value"), format!("{text:?}: {e}")))
        .ok()
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{keys, toml, MINIMAL};

    #[test]
    fn header_and_query_param_conflict() {
        let e = toml(&format!(
            "{MINIMAL}\nheader = \"X-Api-Key\"\nquery_param = \"k\""
        ))
        .expect_err("both");
        assert_eq!(keys(&e), vec!["route[0].query_param"]);
        let e = toml(&format!("{MINIMAL}\nheader = \"Host\"")).expect_err("reserved");
        assert_eq!(keys(&e), vec!["route[0].header"]);
    }
}
