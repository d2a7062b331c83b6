//! The master secret, and the two HTTP calls rotation makes with it: minting a key at the
//! API's token endpoint (createSecret) and trying the new key on a cheap URL (testSecret).
//!
//! The master secret is JSON (see the Rotation section of README.md). It is parsed field by field rather than
//! with a derived `Deserialize`, because serde's type errors quote the offending value, and a
//! misplaced `client_secret` must not end up in an error message. Unknown fields are refused
//! (a misspelt `test_url` would otherwise skip the test without a word).

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, ACCEPT, CONTENT_TYPE, USER_AGENT};
use http::{Method, Request, Uri};
use serde_json::{Map, Value};

use super::StepError;
use crate::body::ProxyBody;
use crate::forward::UpstreamClient;
use crate::inject::{self, Injection, Template};
pub use crate::oauth2::endpoint::shown;
use crate::oauth2::endpoint::{self, error_code, form_encode, secure_url, Answer, UrlProblem};
use crate::secrets::Secret;

/// Fields of the token endpoint's answer tried, in order, when `token_field` is not set.
pub const DEFAULT_TOKEN_FIELDS: [&str; 2] = ["access_token", "token"];
/// The field of the rotated secret that holds the key, unless `secret_field` says otherwise.
pub const DEFAULT_SECRET_FIELD: &str = "token";

/// Every field a master secret may have.
const MASTER_FIELDS: [&str; 12] = [
    "client_id",
    "client_secret",
    "token_url",
    "token_request",
    "grant_type",
    "scope",
    "token_field",
    "secret_field",
    "test_url",
    "test_header",
    "test_value",
    "test_query_param",
];

/// How the client credentials are sent to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRequest {
    /// `application/x-www-form-urlencoded` (OAuth 2.0 client credentials; the default).
    Form,
    /// A JSON object with the same fields.
    Json,
}

/// A parsed master secret: the client credentials and how to mint and test a key.
#[derive(Clone)]
pub struct Master {
    /// The master secret's id (for error messages).
    pub id: String,
    /// `client_id`.
    pub client_id: String,
    /// `client_secret`; never printed.
    pub client_secret: Secret,
    /// `token_url`: POSTed to mint a key (https, or http to a loopback host).
    pub token_url: Uri,
    /// `token_request`: `form` (default) or `json`.
    pub token_request: TokenRequest,
    /// `grant_type` sent with the credentials (default `client_credentials`; `""` omits it).
    pub grant_type: Option<String>,
    /// `scope`, sent when set.
    pub scope: Option<String>,
    /// `token_field`: the answer's field holding the key (default `access_token`, then `token`).
    pub token_field: Option<String>,
    /// `secret_field`: the rotated secret's field that holds the key (default `token`).
    pub secret_field: String,
    /// `test_url`: a cheap authenticated GET for testSecret; `None` skips the test.
    pub test_url: Option<Uri>,
    /// How the key is presented on `test_url` (default `Authorization: Bearer {key}`).
    pub test_injection: Injection,
}

impl fmt::Debug for Master {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Master")
            .field("id", &self.id)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("token_url", &shown(&self.token_url))
            .field("token_request", &self.token_request)
            .field("test_url", &self.test_url.as_ref().map(shown))
            .finish_non_exhaustive()
    }
}

/// Parses a URL field: absolute, https, or http to a loopback host only.
fn url_field(master: &str, field: &'static str, text: &str) -> Result<Uri, StepError> {
    let bad = |detail: String| StepError::Master {
        id: master.to_owned(),
        detail,
    };
    match secure_url(text) {
        Ok(uri) => Ok(uri),
        Err(UrlProblem::Invalid) => Err(bad(format!("{field} is not a valid URL"))),
        Err(UrlProblem::NotAbsolute) => Err(bad(format!(
            "{field} must be an absolute URL (https://host/path)"
        ))),
        Err(UrlProblem::Insecure) => Err(StepError::InsecureUrl {
            field,
            url: text.parse().map(|u: Uri| shown(&u)).unwrap_or_default(),
        }),
    }
}

impl Master {
    /// Parses the master secret `id`'s text. Errors name the field, never a value.
    pub fn parse(id: &str, text: &Secret) -> Result<Master, StepError> {
        let bad = |detail: String| StepError::Master {
            id: id.to_owned(),
            detail,
        };
        let doc: Value = serde_json::from_str(text.expose()).map_err(|e| {
            bad(format!(
                "the value is not JSON (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        let Value::Object(obj) = doc else {
            return Err(bad("the value is not a JSON object".into()));
        };
        let mut unknown: Vec<&str> = obj
            .keys()
            .map(String::as_str)
            .filter(|k| !MASTER_FIELDS.contains(k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(bad(format!(
                "unknown field{} {} (known: {})",
                if unknown.len() == 1 { "" } else { "s" },
                unknown
                    .iter()
                    .map(|k| format!("{k:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                MASTER_FIELDS.join(", ")
            )));
        }
        let opt = |field: &str| -> Result<Option<String>, StepError> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(format!("field {field:?} is not a string"))),
            }
        };
        let req = |field: &str| -> Result<String, StepError> {
            match opt(field)? {
                Some(s) if !s.is_empty() => Ok(s),
                _ => Err(bad(format!("field {field:?} is missing or empty"))),
            }
        };
        let client_id = req("client_id")?;
        let client_secret = Secret::new(req("client_secret")?);
        let token_url = url_field(id, "token_url", &req("token_url")?)?;
        let token_request = match opt("token_request")?.as_deref() {
            None | Some("form") => TokenRequest::Form,
            Some("json") => TokenRequest::Json,
            Some(other) => {
                return Err(bad(format!(
                    "token_request {other:?} is not \"form\" or \"json\""
                )))
            }
        };
        let grant_type = match opt("grant_type")? {
            None => Some("client_credentials".to_owned()),
            Some(s) if s.is_empty() => None,
            Some(s) => Some(s),
        };
        let test_url = opt("test_url")?
            .filter(|s| !s.is_empty())
            .map(|u| url_field(id, "test_url", &u))
            .transpose()?;
        let template = opt("test_value")?.unwrap_or_else(|| match obj.get("test_query_param") {
            Some(_) => "{key}".to_owned(),
            None => "Bearer {key}".to_owned(),
        });
        let template = Template::parse(&template.replace("{key}", inject::PLACEHOLDER))
            .map_err(|e| bad(format!("test_value: {e} (write {{key}})")))?;
        let test_injection = match (opt("test_query_param")?, opt("test_header")?) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "set test_header or test_query_param, not both".to_owned()
                ))
            }
            (Some(param), None) if !param.is_empty() => Injection::query(param, template),
            (Some(_), None) => return Err(bad("test_query_param is empty".to_owned())),
            (None, header) => {
                let name = header.unwrap_or_else(|| "authorization".to_owned());
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| bad("test_header is not a valid header name".to_owned()))?;
                Injection::header(name, template)
            }
        };
        Ok(Master {
            id: id.to_owned(),
            client_id,
            client_secret,
            token_url,
            token_request,
            grant_type,
            scope: opt("scope")?.filter(|s| !s.is_empty()),
            token_field: opt("token_field")?.filter(|s| !s.is_empty()),
            secret_field: opt("secret_field")?
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_SECRET_FIELD.to_owned()),
            test_url,
            test_injection,
        })
    }

    /// The token request's fields, in order.
    fn request_fields(&self) -> Vec<(&'static str, &str)> {
        let mut fields = Vec::with_capacity(4);
        if let Some(g) = &self.grant_type {
            fields.push(("grant_type", g.as_str()));
        }
        fields.push(("client_id", self.client_id.as_str()));
        fields.push(("client_secret", self.client_secret.expose()));
        if let Some(s) = &self.scope {
            fields.push(("scope", s.as_str()));
        }
        fields
    }

    /// The token request's content type and body.
    fn request_body(&self) -> (&'static str, Bytes) {
        let fields = self.request_fields();
        match self.token_request {
            TokenRequest::Form => ("application/x-www-form-urlencoded", form_encode(&fields)),
            TokenRequest::Json => {
                let obj: Map<String, Value> = fields
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
                    .collect();
                (
                    "application/json",
                    Bytes::from(Value::Object(obj).to_string()),
                )
            }
        }
    }
}

/// The HTTP side of rotation: one pooled client and a per-call time limit.
#[derive(Clone)]
pub struct TokenClient {
    /// The pooled rustls client (the proxy's own).
    client: UpstreamClient,
    /// Time allowed for one call, answer included.
    timeout: Duration,
}

impl fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TokenClient {
    /// A client allowing `timeout` per call.
    pub fn new(client: UpstreamClient, timeout: Duration) -> TokenClient {
        TokenClient { client, timeout }
    }

    /// Sends `req` and reads the answer (bounded) within the time limit.
    async fn call(
        &self,
        what: &'static str,
        url: &Uri,
        req: Request<ProxyBody>,
    ) -> Result<Answer, CallError> {
        endpoint::call(&self.client, self.timeout, req)
            .await
            .map_err(|e| match e {
                endpoint::CallError::Timeout(timeout) => CallError::Timeout {
                    what,
                    url: shown(url),
                    timeout,
                },
                endpoint::CallError::Failed(d) => CallError::Failed(d),
            })
    }

    /// Mints a new key at the master secret's token endpoint.
    pub async fn mint(&self, master: &Master) -> Result<Secret, StepError> {
        let url = &master.token_url;
        let fail = |detail: String| StepError::TokenEndpoint {
            url: shown(url),
            detail,
        };
        let (content_type, body) = master.request_body();
        let req = Request::builder()
            .method(Method::POST)
            .uri(url.clone())
            .header(CONTENT_TYPE, content_type)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, user_agent())
            .body(ProxyBody::full(body))
            .map_err(|_| fail("cannot build the request".into()))?;
        let answer = self
            .call("token endpoint", url, req)
            .await
            .map_err(|e| e.into_step(fail))?;
        if !(200..300).contains(&answer.status) {
            let code = error_code(&answer.body)
                .map(|c| format!(" (error {c:?})"))
                .unwrap_or_default();
            return Err(fail(format!("answered {}{code}", answer.status)));
        }
        let doc: Value = serde_json::from_slice(&answer.body)
            .map_err(|_| fail(format!("answered {} but not with JSON", answer.status)))?;
        let Value::Object(obj) = doc else {
            return Err(fail("the answer is not a JSON object".into()));
        };
        let fields: Vec<&str> = match &master.token_field {
            Some(f) => vec![f.as_str()],
            None => DEFAULT_TOKEN_FIELDS.to_vec(),
        };
        let key = fields.iter().find_map(|f| obj.get(*f).map(|v| (*f, v)));
        let key = match key {
            Some((_, Value::String(s))) => Secret::new(s.clone()),
            Some((f, _)) => return Err(fail(format!("field {f:?} of the answer is not a string"))),
            None => {
                let mut present: Vec<&str> = obj.keys().map(String::as_str).collect();
                present.sort_unstable();
                return Err(fail(format!(
                    "the answer has no {} field (it has: {})",
                    fields
                        .iter()
                        .map(|f| format!("{f:?}"))
                        .collect::<Vec<_>>()
                        .join(" or "),
                    present.join(", ")
                )));
            }
        };
        inject::check_value(key.expose())
            .map_err(|e| fail(format!("the new key cannot be used: {e}")))?;
        Ok(key)
    }

    /// GETs the master secret's `test_url` with `key`; returns the status. `Ok(None)`: no test_url.
    pub async fn probe(&self, master: &Master, key: &Secret) -> Result<Option<u16>, StepError> {
        let Some(url) = &master.test_url else {
            return Ok(None);
        };
        let unreachable = |detail: String| StepError::TestUnreachable {
            url: shown(url),
            detail,
        };
        let cred = master
            .test_injection
            .render(key)
            .map_err(|e| unreachable(format!("cannot present the key: {e}")))?;
        let mut builder = Request::builder()
            .method(Method::GET)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, user_agent());
        for (name, value) in cred.headers() {
            builder = builder.header(name, value.clone());
        }
        let uri = match cred.query() {
            Some((param, pair)) => {
                let query = inject::set_query(url.query(), param, pair);
                let mut parts = url.clone().into_parts();
                parts.path_and_query = format!("{}?{query}", url.path()).parse().ok();
                Uri::from_parts(parts).map_err(|_| unreachable("cannot build the URL".into()))?
            }
            None => url.clone(),
        };
        let req = builder
            .uri(uri)
            .body(ProxyBody::empty())
            .map_err(|_| unreachable("cannot build the request".into()))?;
        let answer = self
            .call("test_url", url, req)
            .await
            .map_err(|e| e.into_step(unreachable))?;
        Ok(Some(answer.status))
    }
}

/// `keyproxy-rotation/<version>`.
fn user_agent() -> &'static str {
    concat!("keyproxy-rotation/", env!("CARGO_PKG_VERSION"))
}

/// Why one HTTP call failed.
enum CallError {
    /// No answer in time.
    Timeout {
        what: &'static str,
        url: String,
        timeout: Duration,
    },
    /// Connection, TLS or protocol failure.
    Failed(String),
}

impl CallError {
    fn into_step(self, other: impl FnOnce(String) -> StepError) -> StepError {
        match self {
            CallError::Timeout { what, url, timeout } => StepError::Timeout { what, url, timeout },
            CallError::Failed(d) => other(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Master, StepError> {
        Master::parse("m", &Secret::new(v.to_string()))
    }

    fn base() -> Value {
        serde_json::json!({
            "client_id": "id-1",
            "client_secret": "cs_very_secret",
            "token_url": "https://auth.example.com/oauth/token?x=1",
        })
    }

    #[test]
    fn defaults() {
        let m = parse(base()).expect("master");
        assert_eq!(m.token_request, TokenRequest::Form);
        assert_eq!(m.grant_type.as_deref(), Some("client_credentials"));
        assert_eq!(m.secret_field, "token");
        assert!(m.test_url.is_none() && m.token_field.is_none());
        assert_eq!(m.test_injection.describe(), "header authorization");
        assert!(!format!("{m:?}").contains("cs_very_secret"));
        assert!(!format!("{m:?}").contains("x=1"), "query hidden");
        let (ct, body) = m.request_body();
        assert_eq!(ct, "application/x-www-form-urlencoded");
        assert_eq!(
            body,
            "grant_type=client_credentials&client_id=id-1&client_secret=cs_very_secret"
        );
    }

    #[test]
    fn json_requests_and_options() {
        let mut v = base();
        v["token_request"] = "json".into();
        v["grant_type"] = "".into();
        v["scope"] = "a b".into();
        v["test_url"] = "http://127.0.0.1:9/ping".into();
        v["test_header"] = "X-Api-Key".into();
        v["test_value"] = "{key}".into();
        v["secret_field"] = "api_key".into();
        let m = parse(v).expect("master");
        let (ct, body) = m.request_body();
        assert_eq!(ct, "application/json");
        let sent: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            sent,
            serde_json::json!({"client_id": "id-1", "client_secret": "cs_very_secret", "scope": "a b"})
        );
        assert_eq!(m.secret_field, "api_key");
        assert_eq!(m.test_injection.describe(), "header x-api-key");
        let c = m.test_injection.render(&Secret::new("k1")).expect("render");
        assert_eq!(c.header_lines(), b"x-api-key: k1\r\n");
    }

    #[test]
    fn errors_name_fields_never_values() {
        let cases = [
            (
                serde_json::json!({"client_id": "i", "token_url": "https://a/t"}),
                "\"client_secret\" is missing",
            ),
            (
                serde_json::json!({"client_id": "i", "client_secret": 5, "token_url": "https://a/t"}),
                "\"client_secret\" is not a string",
            ),
            (
                {
                    let mut v = base();
                    v["test_ulr"] = "https://a/p".into();
                    v
                },
                "unknown field \"test_ulr\"",
            ),
            (
                {
                    let mut v = base();
                    v["token_request"] = "xml".into();
                    v
                },
                "not \"form\" or \"json\"",
            ),
            (
                {
                    let mut v = base();
                    v["token_url"] = "http://auth.example.com/t".into();
                    v
                },
                "https is required",
            ),
            (
                {
                    let mut v = base();
                    v["test_url"] = "http://10.0.0.1/ping".into();
                    v
                },
                "test_url http://10.0.0.1/ping",
            ),
            (
                {
                    let mut v = base();
                    v["token_url"] = "/relative".into();
                    v
                },
                "absolute URL",
            ),
            (
                {
                    let mut v = base();
                    v["test_value"] = "Bearer".into();
                    v
                },
                "write {key}",
            ),
        ];
        for (v, want) in cases {
            let e = parse(v).expect_err("refused").to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
            assert!(!e.contains("cs_very_secret"));
        }
        let e = Master::parse(
            "m",
            &Secret::new("{\"client_secret\": \"cs_very_secret\" oops"),
        )
        .expect_err("bad json")
        .to_string();
        assert!(
            e.contains("not JSON") && !e.contains("cs_very_secret"),
            "{e}"
        );
    }
}
