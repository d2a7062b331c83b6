//! A route's allowlist (`allow`): `METHOD PATH` patterns compiled once from the config, and the
//! match both engines run through [`crate::route::allowed`] on the path below the route's prefix.
//!
//! Kept apart from [`crate::route`] so that the config can hold a compiled [`Allow`] without the
//! request rules (which read the config) being below it.

use percent_encoding::percent_decode;

use crate::uri::uri_byte;

/// A route's allowlist: `METHOD PATH` patterns, compiled once from the config.
///
/// In a pattern's path, `*` is exactly one segment, `**` any number of segments (none too), and
/// anything else a literal segment (compared after percent-decoding both sides); a trailing `/`
/// is a literal empty last segment. Method `*` is any method; others compare exactly (methods
/// are case-sensitive). Fail closed where an upstream might read a path otherwise: a request
/// path with an empty segment inside it (`//`), or a segment holding an encoded `/` or `\`
/// (`%2F`, `%5C`, also encoded again, `%252F`), matches no pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    /// The patterns, in configuration order.
    rules: Vec<Rule>,
}

/// One `METHOD PATH` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// `None`: any method.
    method: Option<String>,
    /// The path's segments (after its leading `/`).
    segments: Vec<Seg>,
}

/// One segment of a pattern's path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    /// Exactly this segment, percent-decoded.
    Literal(Vec<u8>),
    /// `*`: one non-empty segment.
    One,
    /// `**`: any number of segments.
    Any,
}

impl Allow {
    /// Compiles `patterns`; `Err`: each bad pattern's index and what is wrong with it.
    pub fn parse(patterns: &[String]) -> Result<Allow, Vec<(usize, String)>> {
        let mut rules = Vec::with_capacity(patterns.len());
        let mut bad = Vec::new();
        for (i, p) in patterns.iter().enumerate() {
            match Rule::parse(p) {
                Ok(r) => rules.push(r),
                Err(e) => bad.push((i, format!("{p:?}: {e}"))),
            }
        }
        if bad.is_empty() {
            Ok(Allow { rules })
        } else {
            Err(bad)
        }
    }

    /// Whether a request with `method` for `path` (below the route's prefix, starting with `/`
    /// or empty; no query) matches a pattern.
    pub fn permits(&self, method: &str, path: &str) -> bool {
        let body = match path {
            "" => "",
            p => match p.strip_prefix('/') {
                Some(b) => b,
                None => return false,
            },
        };
        if !unambiguous(body) {
            return false;
        }
        self.rules
            .iter()
            .any(|r| r.method.as_deref().is_none_or(|m| m == method) && matches(&r.segments, body))
    }
}

impl Rule {
    fn parse(text: &str) -> Result<Rule, String> {
        let mut words = text.split_ascii_whitespace();
        let (Some(method), Some(path), None) = (words.next(), words.next(), words.next()) else {
            return Err("expected METHOD PATH, such as \"GET /reports/*\"".into());
        };
        let method = match method {
            "*" => None,
            m if !m.bytes().all(token_byte) => {
                return Err(format!("{m:?} is not a method"));
            }
            m if m.bytes().any(|b| b.is_ascii_lowercase()) => {
                return Err(format!(
                    "methods are case-sensitive: write {:?}",
                    m.to_ascii_uppercase()
                ));
            }
            m => Some(m.to_owned()),
        };
        let Some(body) = path.strip_prefix('/') else {
            return Err("the path must start with '/'".into());
        };
        let parts: Vec<&str> = body.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, seg) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            segments.push(match *seg {
                "**" => Seg::Any,
                "*" => Seg::One,
                s if s.contains('*') => {
                    return Err(format!(
                        "{s:?}: '*' (one segment) and '**' (any number) must be a whole segment"
                    ))
                }
                "" if !last => return Err("empty segment ('//')".into()),
                "." | ".." => return Err("'.' and '..' segments never match".into()),
                s => {
                    if !s.bytes().all(|b| uri_byte(b) || b == b':' || b == b'@') {
                        return Err(format!(
                            "{s:?}: only URL path characters (percent-encode others)"
                        ));
                    }
                    let decoded: Vec<u8> = percent_decode(s.as_bytes()).collect();
                    if decoded.iter().any(|b| matches!(b, b'/' | b'\\' | 0)) {
                        return Err(format!("{s:?}: an encoded '/', '\\' or NUL never matches"));
                    }
                    Seg::Literal(decoded)
                }
            });
        }
        Ok(Rule { method, segments })
    }
}

/// RFC 9110 `tchar`.
fn token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether every segment of `body` (a path without its leading `/`) means the same to any
/// upstream: no empty segment but the last (a trailing `/`), no `\`, and no `/` or `\` after
/// percent-decoding it up to four times (`%2F`, `%252F`, `%%32%46`: an upstream or a framework
/// behind it may decode again). Allocates only for a segment with a `%`.
fn unambiguous(body: &str) -> bool {
    let b = body.as_bytes();
    if b.first() == Some(&b'/') || b.windows(2).any(|w| w == b"//") || b.contains(&b'\\') {
        return false;
    }
    if !b.contains(&b'%') {
        return true;
    }
    body.split('/').filter(|s| s.contains('%')).all(|seg| {
        let mut cur = seg.as_bytes().to_vec();
        for _ in 0..4 {
            let next: Vec<u8> = percent_decode(&cur).collect();
            if next.iter().any(|c| matches!(c, b'/' | b'\\')) {
                return false;
            }
            if next == cur || !next.contains(&b'%') {
                return true;
            }
            cur = next;
        }
        // Still encoded after four rounds: fail closed.
        false
    })
}

/// The segment of `body` starting at `at`, and where the next one starts (`None`: it is the
/// last).
fn segment_at(body: &str, at: usize) -> (&str, Option<usize>) {
    let rest = &body[at..];
    match rest.find('/') {
        Some(end) => (&rest[..end], Some(at + end + 1)),
        None => (rest, None),
    }
}

/// Whether `segments` match `body` (a path without its leading `/`): wildcard matching over
/// segments, `**` as the star, backtracking to the last `**` only (linear in practice, at
/// most patterns × segments steps). No allocation.
fn matches(segments: &[Seg], body: &str) -> bool {
    let mut p = 0;
    let mut at = Some(0);
    // The last `**` seen: its index, and where the path stood when it took its segments.
    let mut star: Option<(usize, Option<usize>)> = None;
    loop {
        match at {
            None => {
                if segments[p..].iter().all(|s| *s == Seg::Any) {
                    return true;
                }
            }
            Some(off) => {
                let (seg, next) = segment_at(body, off);
                match segments.get(p) {
                    Some(Seg::Any) => {
                        star = Some((p, at));
                        p += 1;
                        continue;
                    }
                    Some(Seg::One) if !seg.is_empty() => {
                        p += 1;
                        at = next;
                        continue;
                    }
                    Some(Seg::Literal(l))
                        if percent_decode(seg.as_bytes()).eq(l.iter().copied()) =>
                    {
                        p += 1;
                        at = next;
                        continue;
                    }
                    _ => {}
                }
            }
        }
        // No match here: the last `**` takes one more segment, if there is one.
        match star {
            Some((sp, Some(from))) => {
                let next = segment_at(body, from).1;
                star = Some((sp, next));
                p = sp + 1;
                at = next;
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(patterns: &[&str]) -> Allow {
        let p: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
        Allow::parse(&p).expect("patterns")
    }

    #[test]
    fn allow_star_is_one_segment_and_double_star_any() {
        let a = allow(&["GET /reports/*", "POST /reports/*/run", "GET /status"]);
        for (m, p) in [
            ("GET", "/reports/1"),
            ("GET", "/reports/q%31"),
            ("POST", "/reports/7/run"),
            ("GET", "/status"),
            ("GET", "/st%61tus"),
        ] {
            assert!(a.permits(m, p), "{m} {p}");
        }
        for (m, p) in [
            ("GET", "/reports"),
            ("GET", "/reports/"),
            ("GET", "/reports/1/2"),
            ("HEAD", "/reports/1"),
            ("get", "/reports/1"),
            ("POST", "/reports/7/run/x"),
            ("POST", "/reports//run"),
            ("GET", "/status/"),
            ("GET", "/Status"),
            ("GET", "/status;x"),
            ("GET", ""),
            ("GET", "/"),
            ("GET", "//status"),
            ("GET", "status"),
        ] {
            assert!(!a.permits(m, p), "{m} {p}");
        }
        let a = allow(&["* /files/**", "GET /", "DELETE /a/**/z"]);
        for (m, p) in [
            ("PUT", "/files"),
            ("GET", "/files/"),
            ("GET", "/files/a/b/c.txt"),
            ("GET", "/"),
            ("GET", ""),
            ("DELETE", "/a/z"),
            ("DELETE", "/a/b/c/z"),
        ] {
            assert!(a.permits(m, p), "{m} {p}");
        }
        for (m, p) in [
            ("GET", "/filesX"),
            ("GET", "/files//x"),
            ("GET", "/other"),
            ("DELETE", "/a/z/b"),
            ("DELETE", "/a/b"),
        ] {
            assert!(!a.permits(m, p), "{m} {p}");
        }
    }

    #[test]
    fn allow_refuses_encoded_separators_in_any_case() {
        let a = allow(&["GET /reports/*", "GET /files/**"]);
        for p in [
            "/reports/a%2Fb",
            "/reports/a%2fb",
            "/reports/a%5Cb",
            "/reports/a%5cb",
            "/reports/a%252Fb",
            "/reports/a%25252fb",
            "/files/x/a%2F..%2Fadmin",
            "/files/a\\b",
            "/files/a//b",
            "/reports/a%%32%46b",
            "/reports/a%2%46b",
            "/reports/a%25%32%66b",
        ] {
            assert!(!a.permits("GET", p), "{p}");
        }
        assert!(a.permits("GET", "/reports/a%20b"));
        assert!(a.permits("GET", "/reports/a%25b"));
    }

    #[test]
    fn allow_matching_is_linear_enough() {
        let a = allow(&["GET /**/a/**/b/**/c/**/d"]);
        let long = "/x".repeat(2000);
        let start = std::time::Instant::now();
        assert!(!a.permits("GET", &long));
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }
}
