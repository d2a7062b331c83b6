//! Rotation under load: keyproxy (the real binary) serves a steady stream of requests from
//! concurrent clients to the token API's protected paths while the rotation function rotates
//! the key again and again (in-process `rotate_now` against moto). Required: no client sees a
//! failure, every new key is used through keyproxy (where the API makes it needed), and
//! keyproxy's `GetSecretValue` calls stay within a budget computed from the elapsed time, the
//! refresh interval and the rotations.
//!
//! The runs here are short (about 20 s each, one at a time): 20 rotations 0.6 s apart with a
//! `refresh_cooldown` of 0.5 s, and 20 rotations 0.3 s apart with the default cooldown (5 s),
//! for an API that keeps only the two newest keys valid. A longer run, by hand:
//!
//! ```sh
//! KEYPROXY_ROTATIONS=200 KEYPROXY_ROTATION_PERIOD=30s \
//!   cargo test --release --test rotation_load -- --ignored --nocapture
//! ```
//!
//! `KEYPROXY_ROTATIONS` (default 200), `KEYPROXY_ROTATION_PERIOD` (time between rotations,
//! default 30s), `KEYPROXY_LOAD_CLIENTS` (default 8) and `KEYPROXY_REFRESH_INTERVAL` (default
//! 5m) shape the long run (`long_run_*`).

mod common;
mod token_api;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::types::RotationRulesType;
use common::*;
use keyproxy::rotation::{self, RotateOptions, Rotator, Settings};
use serde_json::{json, Value};
use token_api::{Revocation, TokenApi};

const SECRET: &str = "prod/orders/api";
const MASTER: &str = "prod/orders/master";
const CLIENT_ID: &str = "orders-rotation";
const CLIENT_SECRET: &str = "cs_load_never_logged";
/// keyproxy's route `refresh_cooldown` in the first runs; rotations are spaced further apart.
const COOLDOWN: Duration = Duration::from_millis(500);
/// Pause between back-to-back rotations, far inside the default `refresh_cooldown` (5 s).
const BACK_TO_BACK: Duration = Duration::from_millis(300);

/// One run at a time: each starts moto, keyproxy and eight busy clients on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The shape of one run.
#[derive(Debug, Clone)]
struct Plan {
    name: &'static str,
    revocation: Revocation,
    refresh_interval: Duration,
    rotations: usize,
    /// Pause between the end of one rotation and the start of the next.
    pause: Duration,
    clients: usize,
    /// Give the master secret a `test_url` (testSecret then uses the new key before
    /// finishSecret, which revokes the old one in `OnFirstUseOfNewer` mode).
    test_url: bool,
    /// After each rotation, another consumer (a sidecar that already has the new key) uses it
    /// once, which is what makes an `OnFirstUseOfNewer` API revoke the old key.
    peer_uses_new_key: bool,
    /// keyproxy `GetSecretValue` calls allowed per rotation on the 401 path.
    fetches_per_rotation: u64,
    /// The route's `refresh_cooldown`; `None`: the default.
    cooldown: Option<Duration>,
    /// Whether every key issued must be used through keyproxy. An API that keeps two keys valid
    /// lets keyproxy skip one when its fetch comes after a rotation has finished.
    every_key_used: bool,
}

/// What a run measured.
#[derive(Debug, Default)]
struct Figures {
    requests: u64,
    failures: u64,
    failure_samples: Vec<String>,
    rotations: u64,
    rotation_errors: Vec<String>,
    api_401s: u64,
    replays_attempted: f64,
    replays_succeeded: f64,
    fetches: f64,
    budget: f64,
    keys_issued: usize,
    keys_unused: Vec<usize>,
    elapsed: Duration,
    /// keyproxy's RSS 2 s into the load, and at the end (KiB).
    rss_warm_kib: u64,
    rss_end_kib: u64,
}

impl Figures {
    fn print(&self, plan: &Plan) {
        println!(
            "rotation_load [{}]: mode {:?}, refresh_interval {}, {} clients\n  \
             requests {} | failures {} | rotations {} (errors {}) | keys issued {} (unused by keyproxy: {:?})\n  \
             API 401s {} | replays attempted {} / succeeded {} (401s absorbed) | \
             GetSecretValue by keyproxy {} (budget {}) | elapsed {:.1}s ({:.0} req/s)",
            plan.name,
            plan.revocation,
            humantime::format_duration(plan.refresh_interval),
            plan.clients,
            self.requests,
            self.failures,
            self.rotations,
            self.rotation_errors.len(),
            self.keys_issued,
            self.keys_unused,
            self.api_401s,
            self.replays_attempted,
            self.replays_succeeded,
            self.fetches,
            self.budget,
            self.elapsed.as_secs_f64(),
            self.requests as f64 / self.elapsed.as_secs_f64().max(0.001),
        );
        println!(
            "  keyproxy RSS: {:.1} MiB 2 s into the load, {:.1} MiB at the end",
            self.rss_warm_kib as f64 / 1024.0,
            self.rss_end_kib as f64 / 1024.0
        );
        for s in &self.failure_samples {
            println!("  failure: {s}");
        }
        for e in &self.rotation_errors {
            println!("  rotation error: {e}");
        }
    }

    /// Memory stays flat over a long run: at most 16 MiB above its level 2 s into the load.
    fn assert_flat_rss(&self) {
        assert!(
            self.rss_end_kib <= self.rss_warm_kib + 16 * 1024,
            "RSS grew from {} KiB to {} KiB",
            self.rss_warm_kib,
            self.rss_end_kib
        );
    }

    fn assert_ok(&self) {
        assert!(
            self.rotation_errors.is_empty(),
            "rotation errors: {:?}",
            self.rotation_errors
        );
        assert_eq!(
            self.failures, 0,
            "failed requests: {:?}",
            self.failure_samples
        );
        assert!(
            self.keys_unused.is_empty(),
            "keys never used through keyproxy: {:?}",
            self.keys_unused
        );
        assert!(
            self.fetches <= self.budget,
            "{} GetSecretValue calls, budget {}",
            self.fetches,
            self.budget
        );
    }
}

/// Counters shared by the client tasks.
#[derive(Default)]
struct Load {
    requests: AtomicU64,
    failures: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Load {
    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut s = self.samples.lock().expect("samples");
        if s.len() < 10 {
            s.push(what);
        }
    }
}

/// One client: alternates a GET and a JSON POST, checking what the API echoes.
async fn client(kp_url: String, id: usize, stop: Arc<AtomicBool>, load: Arc<Load>) {
    let c = http::client();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let (method, path, body) = if seq % 2 == 0 {
            ("GET", format!("/items/{id}-{seq}"), String::new())
        } else {
            let body = json!({"client": id, "seq": seq, "lines": [{"sku": "A-1", "qty": seq % 7}]})
                .to_string();
            ("POST", "/orders".to_owned(), body)
        };
        let headers: &[(&str, &str)] = if body.is_empty() {
            &[]
        } else {
            &[("content-type", "application/json")]
        };
        let r = http::send_with(
            &c,
            method,
            &format!("{kp_url}/api{path}"),
            headers,
            body.clone(),
        )
        .await;
        load.requests.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(r) if r.status == 200 => {
                let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
                if v["method"] != method || v["path"] != path.as_str() || v["body"] != body.as_str()
                {
                    load.fail(format!("{method} {path}: wrong echo {}", r.text()));
                }
            }
            Ok(r) => load.fail(format!("{method} {path}: {} {}", r.status, r.text())),
            Err(e) => load.fail(format!("{method} {path}: {e}")),
        }
    }
}

fn route_config(api: &TokenApi, plan: &Plan) -> String {
    let cooldown = plan
        .cooldown
        .map(|c| format!("refresh_cooldown = \"{}\"\n", humantime::format_duration(c)))
        .unwrap_or_default();
    format!(
        "access_log = false\n\
         [[route]]\nname = \"orders\"\npath_prefix = \"/api\"\nupstream = \"{}\"\n\
         secret_id = \"{SECRET}\"\nsecret_field = \"token\"\n\
         refresh_interval = \"{}\"\n{cooldown}",
        api.url(),
        humantime::format_duration(plan.refresh_interval),
    )
}

/// A runtime of its own for a component that is a separate process in production (the token
/// API, the rotation function), so that eight busy clients on the test's runtime cannot starve
/// it and stretch the time between a key's issue and its `PutSecretValue`.
fn own_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Rotates `plan.rotations` times, `plan.pause` apart; after each rotation a peer may use the
/// new key. Returns the number of rotations done and the errors.
async fn rotate_repeatedly(plan: Plan, moto_url: String, api: Arc<TokenApi>) -> (u64, Vec<String>) {
    let sm = sdk_client(&moto_url);
    let rotator = Rotator::new(
        sm.clone(),
        &Settings {
            timeout: Duration::from_secs(5),
            ..Settings::default()
        },
    )
    .expect("rotator");
    let (mut done, mut errors) = (0, Vec::new());
    for _ in 0..plan.rotations {
        tokio::time::sleep(plan.pause).await;
        match rotation::rotate_now(&rotator, SECRET, &RotateOptions::default()).await {
            Ok(_) => {
                done += 1;
                if plan.peer_uses_new_key {
                    let out = sm
                        .get_secret_value()
                        .secret_id(SECRET)
                        .version_stage("AWSCURRENT")
                        .send()
                        .await
                        .expect("current");
                    let v: Value = serde_json::from_str(out.secret_string().unwrap_or_default())
                        .expect("json");
                    let key = v["token"].as_str().unwrap_or_default().to_owned();
                    let r = http::send(
                        "GET",
                        &api.ping_url(),
                        &[("authorization", &format!("Bearer {key}"))],
                        "",
                    )
                    .await;
                    if r.as_ref().map(|r| r.status).ok() != Some(200) {
                        errors.push(format!(
                            "the peer's use of the new key: {:?}",
                            r.map(|r| r.status)
                        ));
                    }
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    (done, errors)
}

async fn run(plan: Plan) -> Figures {
    let _serial = SERIAL.lock().await;
    let moto = Moto::start();
    let sm = moto.client();
    let api_rt = own_runtime();
    let revocation = plan.revocation;
    let api = Arc::new(
        api_rt
            .spawn(async move { TokenApi::start(CLIENT_ID, CLIENT_SECRET, revocation).await })
            .await
            .expect("token api"),
    );
    let mut master = json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token_url": api.token_url()});
    if plan.test_url {
        master["test_url"] = api.ping_url().into();
    }
    create_secret(&sm, MASTER, &master.to_string()).await;
    create_secret(
        &sm,
        SECRET,
        &json!({"master_secret_id": MASTER, "service": "orders"}).to_string(),
    )
    .await;
    sm.rotate_secret()
        .secret_id(SECRET)
        .rotation_rules(
            RotationRulesType::builder()
                .automatically_after_days(1)
                .build(),
        )
        .rotate_immediately(false)
        .send()
        .await
        .expect("enable rotation");
    // The first key, before keyproxy starts.
    let rotator = Rotator::new(moto.client(), &Settings::default()).expect("rotator");
    rotation::rotate_now(&rotator, SECRET, &RotateOptions::default())
        .await
        .expect("first rotation");

    let kp = KeyProxy::start(&route_config(&api, &plan), &aws_env(&moto));
    let started = Instant::now();
    kp.wait_ready(Duration::from_secs(20)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let tasks: Vec<_> = (0..plan.clients)
        .map(|i| tokio::spawn(client(kp.url(""), i, stop.clone(), load.clone())))
        .collect();

    let pid = kp.pid();
    let rss_warm = Arc::new(AtomicU64::new(0));
    let sampler = {
        let rss_warm = rss_warm.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            rss_warm.store(rss_kib(pid), Ordering::Relaxed);
        })
    };

    let rot_rt = own_runtime();
    let (rotations, rotation_errors) = rot_rt
        .spawn(rotate_repeatedly(plan.clone(), moto.url(), api.clone()))
        .await
        .expect("rotations");
    // The last key reaches keyproxy through the 401 path or a background refresh.
    let last = api.issued().last().cloned().unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while plan.every_key_used && api.uses(&last).1 == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client task");
    }

    let _ = sampler.await;
    let mut figures = Figures {
        rss_warm_kib: rss_warm.load(Ordering::Relaxed),
        rss_end_kib: rss_kib(pid),
        elapsed: started.elapsed(),
        rotations,
        rotation_errors,
        ..Figures::default()
    };
    figures.requests = load.requests.load(Ordering::Relaxed);
    figures.failures = load.failures.load(Ordering::Relaxed);
    figures.failure_samples = load.samples.lock().expect("samples").clone();
    figures.api_401s = api.unauthorized();
    figures.replays_attempted = kp
        .counter("keyproxy_replays_attempted_total", &["orders"])
        .await;
    figures.replays_succeeded = kp
        .counter("keyproxy_replays_succeeded_total", &["orders"])
        .await;
    figures.fetches = kp.fetches().await;
    let issued = api.issued();
    figures.keys_issued = issued.len();
    if plan.every_key_used {
        figures.keys_unused = issued
            .iter()
            .enumerate()
            .filter(|(_, k)| api.uses(k).1 == 0)
            .map(|(i, _)| i)
            .collect();
    }
    // The first fetch, the background refreshes that fit in the elapsed time (interval − 10%
    // jitter at the shortest), and the 401 path's fetches for each rotation.
    let refreshes =
        (figures.elapsed.as_secs_f64() / (plan.refresh_interval.as_secs_f64() * 0.9)).ceil();
    figures.budget = 1.0 + refreshes + (figures.rotations * plan.fetches_per_rotation) as f64;
    kp.assert_no_leak(&[CLIENT_SECRET]);
    for k in &issued {
        kp.assert_no_leak(&[k.as_str()]);
    }
    figures.print(&plan);
    drop(api);
    api_rt.shutdown_background();
    rot_rt.shutdown_background();
    figures
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_duration(name: &str, default: Duration) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .unwrap_or(default)
}

/// The short plan of the default test run.
fn short(name: &'static str, revocation: Revocation, refresh_interval: Duration) -> Plan {
    let pending = revocation == Revocation::OnIssue;
    Plan {
        name,
        revocation,
        refresh_interval,
        rotations: 20,
        pause: COOLDOWN + Duration::from_millis(100),
        clients: 8,
        test_url: pending,
        peer_uses_new_key: !pending,
        // OnFirstUseOfNewer: the 401 after the peer's use reads AWSCURRENT once. OnIssue: the 401
        // after createSecret reads AWSCURRENT (unchanged) then AWSPENDING; one more read is
        // allowed in case that 401 beats the PutSecretValue and AWSPENDING is read again.
        fetches_per_rotation: if pending { 3 } else { 1 },
        cooldown: Some(COOLDOWN),
        every_key_used: true,
    }
}

/// The long plan, from `KEYPROXY_*` variables.
fn long(name: &'static str, revocation: Revocation) -> Plan {
    let mut p = short(
        name,
        revocation,
        env_duration("KEYPROXY_REFRESH_INTERVAL", Duration::from_secs(300)),
    );
    p.rotations = env_or("KEYPROXY_ROTATIONS", 200);
    p.pause = env_duration("KEYPROXY_ROTATION_PERIOD", Duration::from_secs(30))
        .max(COOLDOWN + Duration::from_millis(100));
    p.clients = env_or("KEYPROXY_LOAD_CLIENTS", 8);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_401_path_only() {
    run(short(
        "401 path only",
        Revocation::OnFirstUseOfNewer,
        Duration::from_secs(3600),
    ))
    .await
    .assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_with_short_refresh_interval() {
    run(short(
        "1s refresh",
        Revocation::OnFirstUseOfNewer,
        Duration::from_secs(1),
    ))
    .await
    .assert_ok();
}

/// Rotations 0.3 s apart, with the default `refresh_cooldown` (5 s), and an API that keeps only
/// the two newest keys valid (a failed rotation retried, then a manual one): each rotation
/// revokes the key keyproxy holds, and each 401 burst needs its own fetch. A fetch that found a
/// new key must not make the next burst wait for the cooldown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_back_to_back_rotations_with_the_default_cooldown() {
    let plan = Plan {
        name: "back to back",
        revocation: Revocation::KeepNewest(2),
        refresh_interval: Duration::from_secs(3600),
        rotations: 20,
        pause: BACK_TO_BACK,
        clients: 8,
        test_url: true,
        peer_uses_new_key: false,
        // One AWSCURRENT read per 401 burst: the new AWSCURRENT is the key the API accepts.
        fetches_per_rotation: 1,
        cooldown: None,
        every_key_used: false,
    };
    let f = run(plan).await;
    f.assert_ok();
    assert!(f.fetches <= 25.0, "{} GetSecretValue calls", f.fetches);
}

/// The API revokes the old key the moment createSecret mints the new one, while `AWSCURRENT`
/// still names the old key until finishSecret: only keyproxy's `AWSPENDING` fallback on a 401
/// can keep every request working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_key_revoked_on_issue_needs_pending_fallback() {
    run(short(
        "revoked on issue",
        Revocation::OnIssue,
        Duration::from_secs(3600),
    ))
    .await
    .assert_ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by hand (see the module docs)"]
async fn long_run_revoked_on_first_use_of_newer() {
    let f = run(long(
        "long, first use of newer",
        Revocation::OnFirstUseOfNewer,
    ))
    .await;
    f.assert_ok();
    f.assert_flat_rss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by hand (see the module docs)"]
async fn long_run_revoked_on_issue() {
    let f = run(long("long, revoked on issue", Revocation::OnIssue)).await;
    f.assert_ok();
    f.assert_flat_rss();
}
