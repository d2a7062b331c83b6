//! Rendering a secret version into the credential a route injects, and setting it on a request.
//!
//! A route injects one or more headers and at most one query parameter ([`Injection`]); each
//! value comes from a [`Template`] whose placeholders are `{secret}` (the whole text, or its
//! `secret_field`) and `{secret.FIELD}` (that JSON field of the same version). Rendering happens
//! when a secret changes, not per request: the cache stores the finished [`Credential`] (every
//! header value marked sensitive, the HTTP/1.1 lines written out, the query pair encoded), one
//! per route per version, so the request path only copies bytes into place and a rotation can
//! never mix the fields of two versions.

use std::cell::OnceCell;
use std::fmt;

use base64::Engine as _;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{Map, Value};

use crate::secrets::Secret;

/// The placeholder for the whole secret (or its `secret_field`).
pub const PLACEHOLDER: &str = "{secret}";
/// How a field placeholder starts: `{secret.FIELD}`.
const FIELD_OPEN: &str = "{secret.";

/// One piece of a template.
#[derive(Clone, PartialEq, Eq)]
enum Part {
    /// Literal text.
    Text(String),
    /// `{secret}`.
    Secret,
    /// `{secret.FIELD}`.
    Field(String),
}

/// A value template such as `Bearer {secret}` or `{secret.key_id}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    /// The pieces, in order.
    parts: Vec<Part>,
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Template({:?})", self.as_text())
    }
}

/// Why a template or a rendered credential was refused. Never carries the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// The template has no placeholder.
    #[error("the template must contain {PLACEHOLDER} or {{secret.FIELD}}")]
    NoPlaceholder,
    /// The template's own text cannot go in a header.
    #[error("the template has a character that cannot go in an HTTP header")]
    BadTemplateText,
    /// `{secret.` without its closing brace.
    #[error("a {{secret. placeholder is not closed with '}}'")]
    UnclosedField,
    /// `{secret.}`.
    #[error("{{secret.}} names no field: write {{secret.FIELD}}")]
    EmptyField,
    /// A field name that is not plain.
    #[error("field name {0:?} in {{secret.FIELD}}: use letters, digits, '_' or '-'")]
    BadFieldName(String),
    /// A field is read but the value is not JSON.
    #[error("field {0:?} is read from the value, but the value is not JSON")]
    NotJson(String),
    /// A field is read but the value is JSON other than an object.
    #[error("field {0:?} is read from the value, but the value is not a JSON object")]
    NotObject(String),
    /// The field is not in the value.
    #[error("JSON field {0:?} is missing")]
    MissingField(String),
    /// The field is there but is not a string.
    #[error("JSON field {0:?} is not a string")]
    NotString(String),
    /// The value is empty.
    #[error("the value is empty")]
    Empty,
    /// The value has CR or LF (header injection, or a stray trailing newline).
    #[error("the value contains a CR or LF byte")]
    LineBreak,
    /// The value has another control byte, or is not ASCII, and cannot go in a header.
    #[error(
        "the value contains a byte that is not allowed in an HTTP header (control or non-ASCII)"
    )]
    IllegalByte,
    /// Leading or trailing white space (would be stripped by HTTP parsers).
    #[error("the value starts or ends with white space")]
    Whitespace,
    /// A Basic username with `:` (RFC 7617: the first colon ends the user-id).
    #[error("the username contains ':' (RFC 7617 does not allow it in a Basic user-id)")]
    ColonInUsername,
    /// Where in the route's credential the problem is.
    #[error("{place}: {error}")]
    At {
        /// `header x-api-key`, `basic_auth`, `query parameter api_key`.
        place: String,
        /// The problem.
        error: Box<InjectError>,
    },
}

impl InjectError {
    /// The problem itself, without where it is.
    pub fn cause(&self) -> &InjectError {
        match self {
            InjectError::At { error, .. } => error.cause(),
            e => e,
        }
    }

    fn at(self, place: impl Into<String>) -> InjectError {
        InjectError::At {
            place: place.into(),
            error: Box::new(self),
        }
    }
}

/// Whether `name` can be a `{secret.FIELD}` field name.
fn plain_field(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Template {
    /// Parses a template; it must contain `{secret}` or `{secret.FIELD}` at least once.
    pub fn parse(text: &str) -> Result<Template, InjectError> {
        let t = Template::parse_any(text)?;
        if !t.has_placeholder() {
            return Err(InjectError::NoPlaceholder);
        }
        Ok(t)
    }

    /// Parses a template that may also be plain text (a fixed Basic username, an empty
    /// password).
    pub fn parse_any(text: &str) -> Result<Template, InjectError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find("{secret") {
            literal.push_str(&rest[..at]);
            let after = &rest[at..];
            if let Some(after_placeholder) = after.strip_prefix(PLACEHOLDER) {
                Template::push_text(&mut parts, &mut literal)?;
                parts.push(Part::Secret);
                rest = after_placeholder;
            } else if let Some(field) = after.strip_prefix(FIELD_OPEN) {
                let close = field.find('}').ok_or(InjectError::UnclosedField)?;
                let name = &field[..close];
                if name.is_empty() {
                    return Err(InjectError::EmptyField);
                }
                if !plain_field(name) {
                    return Err(InjectError::BadFieldName(name.to_owned()));
                }
                Template::push_text(&mut parts, &mut literal)?;
                parts.push(Part::Field(name.to_owned()));
                rest = &field[close + 1..];
            } else {
                // `{secretx`: plain text.
                let (open, tail) = after.split_at("{secret".len());
                literal.push_str(open);
                rest = tail;
            }
        }
        literal.push_str(rest);
        Template::push_text(&mut parts, &mut literal)?;
        Ok(Template { parts })
    }

    /// Ends a literal piece (if any), checking its text.
    fn push_text(parts: &mut Vec<Part>, literal: &mut String) -> Result<(), InjectError> {
        if literal.is_empty() {
            return Ok(());
        }
        if literal
            .bytes()
            .any(|b| (b < 0x20 && b != b'\t') || b >= 0x7f)
        {
            return Err(InjectError::BadTemplateText);
        }
        parts.push(Part::Text(std::mem::take(literal)));
        Ok(())
    }

    /// The template's text, as configured.
    pub fn as_text(&self) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Secret => out.push_str(PLACEHOLDER),
                Part::Field(f) => {
                    out.push_str(FIELD_OPEN);
                    out.push_str(f);
                    out.push('}');
                }
            }
        }
        out
    }

    /// Whether it has any placeholder.
    pub fn has_placeholder(&self) -> bool {
        self.parts.iter().any(|p| !matches!(p, Part::Text(_)))
    }

    /// Whether it uses `{secret}` (the whole text, or `secret_field`).
    pub fn uses_secret(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Secret))
    }

    /// The fields its `{secret.FIELD}` placeholders read.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(f) => Some(f.as_str()),
            _ => None,
        })
    }

    /// The literal text of the template (placeholders left out).
    fn literal_text(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Text(t) => Some(t.as_str()),
            _ => None,
        })
    }

    /// Renders the template from `values`, each substituted value passing `check`.
    fn render(
        &self,
        values: &Values<'_>,
        check: fn(&str) -> Result<(), InjectError>,
    ) -> Result<String, InjectError> {
        let mut out = String::new();
        for p in &self.parts {
            let v = match p {
                Part::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Part::Secret => values.secret()?,
                Part::Field(f) => values.field(f)?,
            };
            check(v)?;
            out.push_str(v);
        }
        Ok(out)
    }
}

/// What a version's text holds, for placeholders: the JSON object, parsed on first use.
#[derive(Debug, Clone)]
enum Doc {
    Object(Map<String, Value>),
    NotJson,
    NotObject,
}

/// What the placeholders of one secret version stand for: `{secret}` is the whole text, or its
/// `secret_field`; `{secret.FIELD}` is a JSON field of the text. The text is parsed as JSON at
/// most once, and only if a field is read.
pub struct Values<'a> {
    /// The version's text.
    text: &'a str,
    /// The field `{secret}` stands for, if not the whole text.
    secret_field: Option<&'a str>,
    /// The parsed text.
    doc: OnceCell<Doc>,
}

impl<'a> Values<'a> {
    /// The values of `text`, with `{secret}` standing for its `secret_field` if set.
    pub fn new(text: &'a str, secret_field: Option<&'a str>) -> Values<'a> {
        Values {
            text,
            secret_field,
            doc: OnceCell::new(),
        }
    }

    /// What `{secret}` stands for.
    pub fn secret(&self) -> Result<&str, InjectError> {
        match self.secret_field {
            None => Ok(self.text),
            Some(f) => self.field(f),
        }
    }

    /// The string in JSON field `name`. The error says why there is none, never what the
    /// value is.
    pub fn field(&self, name: &str) -> Result<&str, InjectError> {
        let doc = self
            .doc
            .get_or_init(|| match serde_json::from_str::<Value>(self.text) {
                Ok(Value::Object(m)) => Doc::Object(m),
                Ok(_) => Doc::NotObject,
                Err(_) => Doc::NotJson,
            });
        match doc {
            Doc::NotJson => Err(InjectError::NotJson(name.to_owned())),
            Doc::NotObject => Err(InjectError::NotObject(name.to_owned())),
            Doc::Object(m) => match m.get(name) {
                Some(Value::String(s)) => Ok(s),
                Some(_) => Err(InjectError::NotString(name.to_owned())),
                None => Err(InjectError::MissingField(name.to_owned())),
            },
        }
    }
}

/// How one injected header's value is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderTemplate {
    /// A template, e.g. `Bearer {secret}`.
    Value(Template),
    /// `Basic base64(username:password)` (RFC 7617), each part a template.
    Basic {
        /// The user-id; must not render to text containing `:`.
        username: Template,
        /// The password.
        password: Template,
    },
}

/// Where and how a route places its credential: headers (each name once) and at most one
/// query parameter. Built by config validation; the app's own copies of each are removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    /// Header names (lower case, distinct) and how each value is made, in order.
    headers: Vec<(HeaderName, HeaderTemplate)>,
    /// The query parameter's name and value template.
    query: Option<(String, Template)>,
}

/// A credential rendered and ready to set on a request: every header a route injects and its
/// query pair, all from one secret version.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    /// Header names and values (each marked sensitive: HPACK never indexes it).
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The same headers as HTTP/1.1 lines, `name: value\r\n` each, for the fast path.
    lines: Vec<u8>,
    /// The query parameter's name and the encoded `name=value` pair to append.
    query: Option<(String, String)>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Credential");
        for (name, _) in &self.headers {
            d.field(name.as_str(), &"***");
        }
        if let Some((param, _)) = &self.query {
            d.field("query", &format_args!("{param}=***"));
        }
        d.finish()
    }
}

impl Credential {
    /// The headers to set (values sensitive).
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }

    /// The headers as HTTP/1.1 lines (`name: value\r\n` each).
    pub fn header_lines(&self) -> &[u8] {
        &self.lines
    }

    /// The query parameter: its name and the encoded `name=value` pair.
    pub fn query(&self) -> Option<(&str, &str)> {
        self.query
            .as_ref()
            .map(|(p, pair)| (p.as_str(), pair.as_str()))
    }
}

/// Characters left as they are in a query component; everything else is percent-encoded.
const QUERY_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Checks that a value can be placed in a header or URL at all.
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

/// Checks a value for a Basic username or password: it is base64-encoded, so white space and
/// UTF-8 are fine, but not emptiness or control bytes.
fn check_basic_part(v: &str) -> Result<(), InjectError> {
    if v.is_empty() {
        return Err(InjectError::Empty);
    }
    if v.bytes().any(|b| b == b'\r' || b == b'\n') {
        return Err(InjectError::LineBreak);
    }
    if v.chars().any(char::is_control) {
        return Err(InjectError::IllegalByte);
    }
    Ok(())
}

impl Injection {
    /// One header from one template (`Authorization: Bearer {secret}`).
    pub fn header(name: HeaderName, template: Template) -> Injection {
        Injection {
            headers: vec![(name, HeaderTemplate::Value(template))],
            query: None,
        }
    }

    /// One query parameter from one template.
    pub fn query(param: String, template: Template) -> Injection {
        Injection {
            headers: Vec::new(),
            query: Some((param, template)),
        }
    }

    /// Several headers (names distinct: config validation sees to it) and an optional query
    /// parameter.
    pub fn new(
        headers: Vec<(HeaderName, HeaderTemplate)>,
        query: Option<(String, Template)>,
    ) -> Injection {
        Injection { headers, query }
    }

    /// The headers it sets and how.
    pub fn header_templates(&self) -> &[(HeaderName, HeaderTemplate)] {
        &self.headers
    }

    /// The query parameter it sets, if any, and its template.
    pub fn query_template(&self) -> Option<(&str, &Template)> {
        self.query.as_ref().map(|(p, t)| (p.as_str(), t))
    }

    /// Whether `name` (any case) is a header it sets (the app's own copy is not forwarded).
    #[inline]
    pub fn sets_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
    }

    /// Whether any template uses `{secret}` (so `secret_field` matters).
    pub fn uses_secret(&self) -> bool {
        self.templates().any(Template::uses_secret)
    }

    /// Every template, in order.
    fn templates(&self) -> impl Iterator<Item = &Template> {
        self.headers
            .iter()
            .flat_map(|(_, h)| match h {
                HeaderTemplate::Value(t) => [Some(t), None],
                HeaderTemplate::Basic { username, password } => [Some(username), Some(password)],
            })
            .flatten()
            .chain(self.query.iter().map(|(_, t)| t))
    }

    /// Renders a plain key (no `secret_field`; `{secret.FIELD}` reads the key as JSON).
    pub fn render(&self, key: &Secret) -> Result<Credential, InjectError> {
        self.render_values(&Values::new(key.expose(), None))
    }

    /// Renders one secret version: `{secret}` is its text or `secret_field`, `{secret.FIELD}`
    /// its JSON fields. Refuses values that cannot be injected safely; the error says where
    /// and why, never what the value is.
    pub fn render_values(&self, values: &Values<'_>) -> Result<Credential, InjectError> {
        let mut headers = Vec::with_capacity(self.headers.len());
        let mut lines = Vec::new();
        for (name, how) in &self.headers {
            let text = match how {
                HeaderTemplate::Value(t) => t
                    .render(values, check_value)
                    .map_err(|e| e.at(format!("header {name}")))?,
                HeaderTemplate::Basic { username, password } => {
                    basic(username, password, values).map_err(|e| e.at("basic_auth"))?
                }
            };
            let mut v = HeaderValue::from_str(&text)
                .map_err(|_| InjectError::IllegalByte.at(format!("header {name}")))?;
            v.set_sensitive(true);
            lines.extend_from_slice(name.as_str().as_bytes());
            lines.extend_from_slice(b": ");
            lines.extend_from_slice(v.as_bytes());
            lines.extend_from_slice(b"\r\n");
            headers.push((name.clone(), v));
        }
        let query = match &self.query {
            None => None,
            Some((param, t)) => {
                let value = t
                    .render(values, check_value)
                    .map_err(|e| e.at(format!("query parameter {param}")))?;
                let pair = format!(
                    "{}={}",
                    utf8_percent_encode(param, QUERY_ENCODE),
                    utf8_percent_encode(&value, QUERY_ENCODE)
                );
                Some((param.clone(), pair))
            }
        };
        Ok(Credential {
            headers,
            lines,
            query,
        })
    }

    /// A short description for logs: `header authorization`, `headers x-a, x-b and query
    /// parameter api_key`, `basic auth`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        let names: Vec<&str> = self
            .headers
            .iter()
            .filter(|(_, h)| matches!(h, HeaderTemplate::Value(_)))
            .map(|(n, _)| n.as_str())
            .collect();
        match names.len() {
            0 => {}
            1 => parts.push(format!("header {}", names[0])),
            _ => parts.push(format!("headers {}", names.join(", "))),
        }
        if self
            .headers
            .iter()
            .any(|(_, h)| matches!(h, HeaderTemplate::Basic { .. }))
        {
            parts.push("basic auth".into());
        }
        if let Some((param, _)) = &self.query {
            parts.push(format!("query parameter {param}"));
        }
        parts.join(" and ")
    }

    /// Removes the app's own copies of every header it sets.
    pub fn strip_headers(&self, headers: &mut HeaderMap) {
        for (name, _) in &self.headers {
            headers.remove(name);
        }
    }
}

/// `Basic base64(username:password)`.
fn basic(
    username: &Template,
    password: &Template,
    values: &Values<'_>,
) -> Result<String, InjectError> {
    let user = username.render(values, check_basic_part)?;
    if user.contains(':') {
        return Err(InjectError::ColonInUsername);
    }
    let pass = password.render(values, check_basic_part)?;
    let joined = format!("{user}:{pass}");
    Ok(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(joined.as_bytes())
    ))
}

/// Whether a Basic username template's own text has a `:` (a config error: RFC 7617).
pub fn literal_colon(t: &Template) -> bool {
    t.literal_text().any(|s| s.contains(':'))
}

/// Writes the upstream request target into `out`: the upstream's base path, the rest of the
/// app's path (after the route's prefix), then the query, with the credential's query
/// parameter set when it has one (the app's own value for it removed). The one place both
/// engines build a target.
pub fn write_target(
    out: &mut Vec<u8>,
    base: &str,
    rest: &[u8],
    query: Option<&str>,
    cred: &Credential,
) {
    out.extend_from_slice(base.as_bytes());
    out.extend_from_slice(rest);
    if base.is_empty() && rest.is_empty() {
        out.push(b'/');
    }
    match cred.query() {
        Some((param, pair)) => {
            out.push(b'?');
            out.extend_from_slice(set_query(query, param, pair).as_bytes());
        }
        None => {
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
        Injection::header(
            HeaderName::from_static("authorization"),
            Template::parse(t).expect("template"),
        )
    }

    fn one_header(c: &Credential) -> &HeaderValue {
        assert_eq!(c.headers().len(), 1);
        &c.headers()[0].1
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
        assert!(Template::parse_any("fixed").is_ok());
    }

    #[test]
    fn field_placeholders_parse_and_round_trip() {
        for text in [
            "{secret.key_id}",
            "K {secret.a-b_1}:{secret}",
            "{secretx} {secret.x}",
            "{{secret.x}}",
        ] {
            let t = Template::parse(text).expect(text);
            assert_eq!(t.as_text(), text);
        }
        let t = Template::parse("{secret.a}-{secret.b}").expect("t");
        assert_eq!(t.fields().collect::<Vec<_>>(), ["a", "b"]);
        assert!(!t.uses_secret());
        for (bad, e) in [
            ("{secret.}", InjectError::EmptyField),
            ("x {secret.key", InjectError::UnclosedField),
            ("{secret.a b}", InjectError::BadFieldName("a b".into())),
            ("{secret.a.b}", InjectError::BadFieldName("a.b".into())),
            ("{secret.é}", InjectError::BadFieldName("é".into())),
        ] {
            assert_eq!(Template::parse(bad).unwrap_err(), e, "{bad}");
        }
    }

    #[test]
    fn renders_header_sensitive() {
        let c = header("Bearer {secret}")
            .render(&Secret::new("abc"))
            .expect("render");
        let v = one_header(&c);
        assert_eq!(v.as_bytes(), b"Bearer abc");
        assert!(v.is_sensitive());
        assert_eq!(c.header_lines(), b"authorization: Bearer abc\r\n");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("abc") && shown.contains("authorization"),
            "{shown}"
        );
    }

    #[test]
    fn renders_template_with_two_placeholders() {
        let c = header("{secret}:{secret}")
            .render(&Secret::new("k"))
            .expect("render");
        assert_eq!(one_header(&c), "k:k");
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
            let err = h.render(&Secret::new(v)).unwrap_err();
            assert_eq!(err.cause(), &e, "value {v:?}");
            assert!(
                err.to_string().starts_with("header authorization: "),
                "{err}"
            );
        }
    }

    fn several() -> Injection {
        let t = |s: &str| HeaderTemplate::Value(Template::parse(s).expect("t"));
        Injection::new(
            vec![
                (HeaderName::from_static("x-api-key"), t("{secret.key_id}")),
                (
                    HeaderName::from_static("x-api-secret"),
                    t("{secret.key_secret}"),
                ),
            ],
            None,
        )
    }

    #[test]
    fn several_headers_come_from_one_version() {
        let doc = r#"{"key_id":"id1","key_secret":"sec1"}"#;
        let c = several()
            .render_values(&Values::new(doc, None))
            .expect("render");
        assert_eq!(
            c.header_lines(),
            b"x-api-key: id1\r\nx-api-secret: sec1\r\n"
        );
        assert!(c.headers().iter().all(|(_, v)| v.is_sensitive()));
        assert!(several().sets_header("X-Api-Secret"));
        assert!(!several().sets_header("authorization"));
        assert_eq!(several().describe(), "headers x-api-key, x-api-secret");
        for (doc, why) in [
            (
                r#"{"key_id":"id1"}"#,
                "header x-api-secret: JSON field \"key_secret\" is missing",
            ),
            (r#"{"key_id":"id1","key_secret":5}"#, "is not a string"),
            ("id1", "the value is not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"key_id":"id1","key_secret":"s\r\nX: 1"}"#, "CR or LF"),
        ] {
            let e = several()
                .render_values(&Values::new(doc, None))
                .expect_err(doc);
            assert!(e.to_string().contains(why), "{doc}: {e}");
            assert!(!e.to_string().contains("id1"), "{e}");
        }
    }

    #[test]
    fn secret_keeps_its_meaning_beside_fields() {
        let inj = header("{secret} {secret.b}");
        let doc = r#"{"a":"A","b":"B"}"#;
        let c = inj
            .render_values(&Values::new(doc, Some("a")))
            .expect("render");
        assert_eq!(one_header(&c), "A B");
        let e = inj
            .render_values(&Values::new(doc, Some("zz")))
            .expect_err("missing");
        assert_eq!(e.cause(), &InjectError::MissingField("zz".into()));
    }

    fn basic_auth(user: &str, pass: &str) -> Injection {
        Injection::new(
            vec![(
                http::header::AUTHORIZATION,
                HeaderTemplate::Basic {
                    username: Template::parse_any(user).expect("u"),
                    password: Template::parse_any(pass).expect("p"),
                },
            )],
            None,
        )
    }

    #[test]
    fn basic_auth_is_rfc_7617() {
        let doc = r#"{"user":"Aladdin","pass":"open sesame","bad":"a:b","ctl":"a\u0001"}"#;
        let v = Values::new(doc, None);
        let c = basic_auth("{secret.user}", "{secret.pass}")
            .render_values(&v)
            .expect("render");
        assert_eq!(one_header(&c), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(one_header(&c).is_sensitive());
        // A colon in the password is fine; in the username it is refused.
        let c = basic_auth("{secret.user}", "{secret.bad}")
            .render_values(&v)
            .expect("render");
        assert_eq!(one_header(&c), "Basic QWxhZGRpbjphOmI=");
        let e = basic_auth("{secret.bad}", "{secret.pass}")
            .render_values(&v)
            .expect_err("colon");
        assert_eq!(e.cause(), &InjectError::ColonInUsername);
        assert!(e.to_string().starts_with("basic_auth: "), "{e}");
        let e = basic_auth("{secret.user}", "{secret.ctl}")
            .render_values(&v)
            .expect_err("control");
        assert_eq!(e.cause(), &InjectError::IllegalByte);
        // A fixed username and an empty password (a key as the user-id).
        let c = basic_auth("{secret.user}", "")
            .render_values(&v)
            .expect("render");
        assert_eq!(one_header(&c), "Basic QWxhZGRpbjo=");
        assert!(literal_colon(
            &Template::parse_any("a:{secret}").expect("t")
        ));
    }

    #[test]
    fn renders_query_encoded() {
        let q = Injection::query("api_key".into(), Template::parse("{secret}").expect("t"));
        let c = q.render(&Secret::new("a+b/c=d")).expect("render");
        assert_eq!(c.query(), Some(("api_key", "api_key=a%2Bb%2Fc%3Dd")));
        assert!(c.headers().is_empty());
        let mut out = Vec::new();
        write_target(&mut out, "/v1", b"/x", Some("api_key=mine&a=1"), &c);
        assert_eq!(out, b"/v1/x?a=1&api_key=a%2Bb%2Fc%3Dd");
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
