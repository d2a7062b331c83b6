//! A fault-injecting HTTP proxy in front of moto, for Secrets Manager outage tests.
//!
//! [`FaultAws`] listens on 127.0.0.1 and forwards every request to moto with a hyper client, so
//! keyproxy's real AWS SDK talks to it as to Secrets Manager (point
//! `AWS_ENDPOINT_URL_SECRETS_MANAGER` at [`FaultAws::url`], or use [`FaultAws::env`]). When a
//! fault is set ([`FaultAws::set`], switchable at run time), `GetSecretValue` calls (header
//! `x-amz-target: secretsmanager.GetSecretValue`) get that fault instead:
//!
//! - [`Fault::Error`]: an AWS JSON 1.1 error, e.g. status 400 with
//!   `{"__type":"ThrottlingException","message":"Rate exceeded"}` and `x-amzn-errortype`;
//! - [`Fault::Delay`]: the answer comes only after a delay (beyond the SDK's attempt timeout);
//! - [`Fault::Reset`]: the connection is closed with a TCP reset and nothing is answered.
//!
//! Every `GetSecretValue` attempt is counted ([`FaultAws::get_calls`]), faulted or not, so a
//! test can measure how often keyproxy retries.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The `x-amz-target` of a `GetSecretValue` call.
pub const GET_SECRET_VALUE: &str = "secretsmanager.GetSecretValue";

/// What `GetSecretValue` calls get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forwarded to moto.
    Pass,
    /// An AWS JSON 1.1 error answer.
    Error {
        /// HTTP status (400 for the client-side errors AWS returns).
        status: u16,
        /// The error code (`__type`, `x-amzn-errortype`).
        code: &'static str,
        /// The error message.
        message: &'static str,
    },
    /// Forwarded to moto after this delay.
    Delay(Duration),
    /// The connection is reset (SO_LINGER 0, then closed) without an answer.
    Reset,
}

impl Fault {
    /// `ThrottlingException: Rate exceeded`.
    pub fn throttling() -> Fault {
        Fault::Error {
            status: 400,
            code: "ThrottlingException",
            message: "Rate exceeded",
        }
    }

    /// `AccessDeniedException`.
    pub fn access_denied() -> Fault {
        Fault::Error {
            status: 400,
            code: "AccessDeniedException",
            message: "User: arn:aws:sts::123456789012:assumed-role/app/task is not authorized to perform: secretsmanager:GetSecretValue",
        }
    }

    /// `ResourceNotFoundException`.
    pub fn not_found() -> Fault {
        Fault::Error {
            status: 400,
            code: "ResourceNotFoundException",
            message: "Secrets Manager can't find the specified secret.",
        }
    }

    /// `DecryptionFailure` (KMS cannot decrypt the secret).
    pub fn decryption_failure() -> Fault {
        Fault::Error {
            status: 400,
            code: "DecryptionFailure",
            message: "Secrets Manager can't decrypt the protected secret text using the provided KMS key.",
        }
    }
}

struct State {
    upstream: String,
    fault: Mutex<Fault>,
    get_calls: AtomicUsize,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// The fault-injecting proxy; stops when dropped.
pub struct FaultAws {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl FaultAws {
    /// Starts a proxy to `upstream` (moto's URL) on 127.0.0.1, passing everything through.
    pub async fn start(upstream: &str) -> FaultAws {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_owned(),
            fault: Mutex::new(Fault::Pass),
            get_calls: AtomicUsize::new(0),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Every close from this side is a reset: a service error (Fault::Reset) drops the
                // connection without an answer, and the peer sees ECONNRESET.
                let _ = stream.set_zero_linger();
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FaultAws { addr, state, task }
    }

    /// Sets what `GetSecretValue` calls get from now on.
    pub fn set(&self, fault: Fault) {
        *self.state.fault.lock().expect("fault") = fault;
    }

    /// `GetSecretValue` attempts seen so far (faulted or passed through).
    pub fn get_calls(&self) -> usize {
        self.state.get_calls.load(Ordering::SeqCst)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Environment for a keyproxy process whose Secrets Manager is this proxy.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL_SECRETS_MANAGER".into(), self.url()),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }
}

impl Drop for FaultAws {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let is_get = req
        .headers()
        .get("x-amz-target")
        .is_some_and(|v| v.as_bytes() == GET_SECRET_VALUE.as_bytes());
    let fault = if is_get {
        state.get_calls.fetch_add(1, Ordering::SeqCst);
        state.fault.lock().expect("fault").clone()
    } else {
        Fault::Pass
    };
    match fault {
        Fault::Pass => forward(&state, req).await,
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            forward(&state, req).await
        }
        Fault::Reset => Err("fault injected: connection reset".into()),
        Fault::Error {
            status,
            code,
            message,
        } => {
            // Read the request first, as a real server would.
            let _ = req.into_body().collect().await;
            let body = serde_json::json!({ "__type": code, "message": message }).to_string();
            Ok(Response::builder()
                .status(status)
                .header("content-type", "application/x-amz-json-1.1")
                .header("x-amzn-errortype", code)
                .header("x-amzn-requestid", "00000000-0000-0000-0000-000000000000")
                .body(Full::new(Bytes::from(body)))?)
        }
    }
}

async fn forward(state: &State, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, BoxError> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let mut out = Request::builder()
        .method(parts.method)
        .uri(format!("{}{pq}", state.upstream));
    for (k, v) in &parts.headers {
        if k != hyper::header::CONNECTION && k != hyper::header::TRANSFER_ENCODING {
            out = out.header(k, v);
        }
    }
    let resp = state.client.request(out.body(Full::new(body))?).await?;
    let (mut parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    for h in [
        hyper::header::CONNECTION,
        hyper::header::TRANSFER_ENCODING,
        hyper::header::CONTENT_LENGTH,
    ] {
        parts.headers.remove(h);
    }
    Ok(Response::from_parts(parts, Full::new(body)))
}
