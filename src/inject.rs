//! Rendering a secret into the credential a route injects, and setting it on a request.
//!
//! Rendering happens when a secret changes, not per request: the cache stores the finished
//! [`Credential`] (a sensitive `HeaderValue`, or an encoded `name=value` query pair), so the
//! request path only copies bytes into place.

use std::fmt;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::secrets::Secret;

/// The placeholder a template must contain.
pub const PLACEHOLDER: &str = "{secret}";

/// A value template such as `Bearer {secret}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    /// The literal text around each `{secret}`: `parts.len()` = placeholders + 1.
    parts: Vec<String>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.parts.join(PLACEHOLDER))
    }
}

/// Why a template or a rendered credential was refused. Never carries the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// The template has no `{secret}`.
    #[error("the template must contain {PLACEHOLDER}")]
    NoPlaceholder,
    /// The template's own text cannot go in a header.
    #[error("the template has a character that cannot go in an HTTP header")]
    BadTemplateText,
    /// The secret is empty.
    #[error("the value is empty")]
    Empty,
    /// The secret has CR or LF (header injection, or a stray trailing newline).
    #[error("the value contains a CR or LF byte")]
    LineBreak,
    /// The secret has another control byte, or is not ASCII, and cannot go in a header.
    #[error(
        "the value contains a byte that is not allowed in an HTTP header (control or non-ASCII)"
    )]
    IllegalByte,
    /// Leading or trailing white space (would be stripped by HTTP parsers).
    #[error("the value starts or ends with white space")]
    Whitespace,
}

impl Template {
    /// Parses a template; it must contain `{secret}` at least once.
    pub fn parse(text: &str) -> Result<Template, InjectError> {
        let parts: Vec<String> = text.split(PLACEHOLDER).map(str::to_owned).collect();
        if parts.len() < 2 {
            return Err(InjectError::NoPlaceholder);
        }
        if parts
            .iter()
            .any(|p| p.bytes().any(|b| (b < 0x20 && b != b'\t') || b >= 0x7f))
        {
            return Err(InjectError::BadTemplateText);
        }
        Ok(Template { parts })
    }

    /// The template's text, as configured.
    pub fn as_text(&self) -> String {
        self.parts.join(PLACEHOLDER)
    }

    /// Renders the template around `secret`.
    fn render(&self, secret: &str) -> String {
        let mut out = String::with_capacity(
            self.parts.iter().map(String::len).sum::<usize>()
                + secret.len() * (self.parts.len() - 1),
        );
        for (i, p) in self.parts.iter().enumerate() {
            if i > 0 {
                out.push_str(secret);
            }
            out.push_str(p);
        }
        out
    }
}

/// Where and how a route places its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection {
    /// In a request header (the app's own value for it is removed first).
    Header {
        /// Header name, e.g. `authorization`.
        name: HeaderName,
        /// Value template, e.g. `Bearer {secret}`.
        template: Template,
    },
    /// In a query parameter (the app's own parameter of that name is removed first).
    Query {
        /// Parameter name, e.g. `api_key`.
        param: String,
        /// Value template, usually just `{secret}`.
        template: Template,
    },
}

/// A credential rendered and ready to set on a request.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A header value, marked sensitive (HPACK never indexes it; `Debug` hides it).
    Header(HeaderValue),
    /// `name=value`, percent-encoded, to append to the query string.
    Query(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Header(_) => f.write_str("Credential::Header(***)"),
            Credential::Query(_) => f.write_str("Credential::Query(***)"),
        }
    }
}

/// Characters left as they are in a query component; everything else is percent-encoded.
const QUERY_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Checks that a secret can be placed in a header or URL at all.
pub fn check_value(secret: &str) -> Result<(), InjectError> {
    if secret.is_empty() {
        return Err(InjectError::Empty);
    }
    if secret.bytes().any(|b| b == b'\r' || b == b'\n') {
        return Err(InjectError::LineBreak);
    }
    if secret.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
        return Err(InjectError::IllegalByte);
    }
    if secret.starts_with([' ', '\t']) || secret.ends_with([' ', '\t']) {
        return Err(InjectError::Whitespace);
    }
    Ok(())
}

impl Injection {
    /// Renders `secret` into a ready credential, refusing values that cannot be injected safely.
    pub fn render(&self, secret: &Secret) -> Result<Credential, InjectError> {
        let raw = secret.expose();
        check_value(raw)?;
        match self {
            Injection::Header { template, .. } => {
                let mut v = HeaderValue::from_str(&template.render(raw))
                    .map_err(|_| InjectError::IllegalByte)?;
                v.set_sensitive(true);
                Ok(Credential::Header(v))
            }
            Injection::Query { param, template } => {
                let value = template.render(raw);
                Ok(Credential::Query(format!(
                    "{}={}",
                    utf8_percent_encode(param, QUERY_ENCODE),
                    utf8_percent_encode(&value, QUERY_ENCODE)
                )))
            }
        }
    }

    /// A short description for logs: `header authorization` or `query parameter api_key`.
    pub fn describe(&self) -> String {
        match self {
            Injection::Header { name, .. } => format!("header {name}"),
            Injection::Query { param, .. } => format!("query parameter {param}"),
        }
    }

    /// Removes the app's own credential for this place from the headers (header injection).
    pub fn strip_header(&self, headers: &mut HeaderMap) {
        if let Injection::Header { name, .. } = self {
            headers.remove(name);
        }
    }
}

/// Writes the upstream request target into `out`: the upstream's base path, the rest of the
/// app's path (after the route's prefix), then the query, with the credential set as a query
/// parameter when the route places it there (the app's own value for it removed). The one
/// place both engines build a target.
pub fn write_target(
    out: &mut Vec<u8>,
    base: &str,
    rest: &[u8],
    query: Option<&str>,
    cred: &Credential,
    injection: &Injection,
) {
    out.extend_from_slice(base.as_bytes());
    out.extend_from_slice(rest);
    if base.is_empty() && rest.is_empty() {
        out.push(b'/');
    }
    match (cred, injection) {
        (Credential::Query(pair), Injection::Query { param, .. }) => {
            out.push(b'?');
            out.extend_from_slice(set_query(query, param, pair).as_bytes());
        }
        _ => {
            if let Some(q) = query {
                out.push(b'?');
                out.extend_from_slice(q.as_bytes());
            }
        }
    }
}

/// Returns `query` without any pair named `param` (compared after percent-decoding), with the
/// rendered `pair` appended.
pub fn set_query(query: Option<&str>, param: &str, pair: &str) -> String {
    let mut out = String::with_capacity(query.map_or(0, str::len) + pair.len() + 1);
    if let Some(q) = query {
        for kv in q.split('&').filter(|kv| !kv.is_empty()) {
            let name = kv.split('=').next().unwrap_or(kv);
            let decoded = percent_decode_str(&name.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned();
            if decoded == param {
                continue;
            }
            out.push_str(kv);
            out.push('&');
        }
    }
    out.push_str(pair);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(t: &str) -> Injection {
        Injection::Header {
            name: HeaderName::from_static("authorization"),
            template: Template::parse(t).expect("template"),
        }
    }

    #[test]
    fn template_needs_placeholder() {
        assert_eq!(
            Template::parse("Bearer").unwrap_err(),
            InjectError::NoPlaceholder
        );
        assert_eq!(
            Template::parse("Bearer\n{secret}").unwrap_err(),
            InjectError::BadTemplateText
        );
        assert_eq!(
            Template::parse("Bearer {secret}").expect("ok").as_text(),
            "Bearer {secret}"
        );
    }

    #[test]
    fn renders_header_sensitive() {
        let c = header("Bearer {secret}")
            .render(&Secret::new("abc"))
            .expect("render");
        match c {
            Credential::Header(v) => {
                assert_eq!(v.as_bytes(), b"Bearer abc");
                assert!(v.is_sensitive());
            }
            Credential::Query(_) => panic!("expected header"),
        }
        assert!(!format!(
            "{:?}",
            header("x{secret}").render(&Secret::new("abc")).expect("r")
        )
        .contains("abc"));
    }

    #[test]
    fn renders_template_with_two_placeholders() {
        let c = header("{secret}:{secret}")
            .render(&Secret::new("k"))
            .expect("render");
        assert_eq!(c, Credential::Header(HeaderValue::from_static("k:k")));
    }

    #[test]
    fn refuses_unsafe_values() {
        let h = header("Bearer {secret}");
        for (v, e) in [
            ("", InjectError::Empty),
            ("abc\r\nX-Evil: 1", InjectError::LineBreak),
            ("abc\n", InjectError::LineBreak),
            ("a\u{0}b", InjectError::IllegalByte),
            ("clé", InjectError::IllegalByte),
            (" abc", InjectError::Whitespace),
        ] {
            assert_eq!(h.render(&Secret::new(v)).unwrap_err(), e, "value {v:?}");
        }
    }

    #[test]
    fn renders_query_encoded() {
        let q = Injection::Query {
            param: "api_key".into(),
            template: Template::parse("{secret}").expect("t"),
        };
        assert_eq!(
            q.render(&Secret::new("a+b/c=d")).expect("render"),
            Credential::Query("api_key=a%2Bb%2Fc%3Dd".into())
        );
    }

    #[test]
    fn set_query_replaces_apps_own_param() {
        assert_eq!(set_query(None, "api_key", "api_key=K"), "api_key=K");
        assert_eq!(
            set_query(Some("a=1&api_key=mine&b=2"), "api_key", "api_key=K"),
            "a=1&b=2&api_key=K"
        );
        assert_eq!(
            set_query(Some("api%5Fkey=mine&x"), "api_key", "api_key=K"),
            "x&api_key=K"
        );
    }
}
