//! The command line: `check`, config errors (exit 64 naming the key), `health`, each
//! subcommand's help, plain logs when stderr is not a terminal.

mod common;

use std::process::Command;

use common::*;

fn keyproxy(args: &[&str], config: Option<&str>, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = scratch("cli");
    let mut cmd = Command::new(binary());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd.args(args);
    if let Some(text) = config {
        let p = dir.join("k.toml");
        std::fs::write(&p, text).expect("write");
        cmd.arg("--config").arg(p);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run keyproxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const ROUTE: &str = "[[route]]\nname = \"a\"\npath_prefix = \"/a\"\nupstream = \"https://api.example.com\"\nsecret_id = \"s\"\n";

#[test]
fn check_accepts_the_shipped_configs() {
    for file in [
        "config/local.toml",
        "config/internet.toml",
        "config/example.toml",
    ] {
        let path = format!("{}/{file}", env!("CARGO_MANIFEST_DIR"));
        let (code, out, err) = keyproxy(&["check", "--config", &path], None, &[]);
        assert_eq!(code, 0, "{file}: {out}{err}");
        assert!(out.contains("configuration is valid"), "{out}");
    }
}

#[test]
fn each_config_error_exits_64_naming_the_key() {
    let cases: &[(&str, &str)] = &[
        ("lisen = \"127.0.0.1:1\"\n", "lisen"),
        ("listen = \"nope\"\n", "listen"),
        ("admin_listen = \"127.0.0.1\"\n", "admin_listen"),
        ("drain_timeout = \"forever\"\n", "drain_timeout"),
        ("max_connections = 0\n", "max_connections"),
        ("ca_bundle = \"/nonexistent.pem\"\n", "ca_bundle"),
        ("[source]\ntype = \"vault\"\n", "source.type"),
        ("[source]\ntype = \"file\"\n", "source.path"),
        ("[aws]\nendpoint_url = \"::\"\n", "aws.endpoint_url"),
        ("[aws]\nregoin = \"x\"\n", "aws.regoin"),
        (
            "[app_auth]\ntoken_env = \"NOPE_NOT_SET\"\n",
            "app_auth.token_env",
        ),
    ];
    for (extra, key) in cases {
        for mode in [&["check"][..], &[][..]] {
            let (code, _, err) = keyproxy(mode, Some(&format!("{extra}{ROUTE}")), &[]);
            assert_eq!(code, 64, "{extra:?} ({mode:?}): {err}");
            assert!(
                err.contains(&format!("{key}:")),
                "{extra:?}: error does not name {key}: {err}"
            );
        }
    }
    let route_cases: &[(&str, &str)] = &[
        ("header = \"bad header\"", "route \"a\" (#1) header"),
        ("value = \"no placeholder\"", "route \"a\" (#1) value"),
        (
            "refresh_interval = \"0s\"",
            "route \"a\" (#1) refresh_interval",
        ),
        (
            "max_replay_body = \"lots\"",
            "route \"a\" (#1) max_replay_body",
        ),
        ("retry_on_401 = \"yes\"", "route \"a\" (#1) retry_on_401"),
        ("timeout = \"-1s\"", "route \"a\" (#1) timeout"),
        ("version_stage = \"\"", "route \"a\" (#1) version_stage"),
        ("secret_feild = \"token\"", "route \"a\" (#1) secret_feild"),
        (
            "query_param = \"k\"\nheader = \"X\"",
            "route \"a\" (#1) query_param",
        ),
    ];
    for (extra, key) in route_cases {
        let (code, _, err) = keyproxy(&["check"], Some(&format!("{ROUTE}{extra}\n")), &[]);
        assert_eq!(code, 64, "{extra:?}: {err}");
        assert!(
            err.contains(&format!("{key}:")),
            "{extra:?}: error does not name {key}: {err}"
        );
    }
    let (code, _, err) = keyproxy(
        &["check"],
        Some(&ROUTE.replace("https://api.example.com", "ftp://x")),
        &[],
    );
    assert_eq!(code, 64);
    assert!(
        err.contains("k.toml:4: route \"a\" (#1) upstream:"),
        "{err}"
    );
    // Every problem at once, with the file named.
    let (code, _, err) = keyproxy(
        &["check"],
        Some(&format!("listen = \"x\"\n{ROUTE}timeout = \"x\"\n")),
        &[],
    );
    assert_eq!(code, 64);
    assert!(
        err.contains("2 problems") && err.contains("k.toml"),
        "{err}"
    );
}

#[test]
fn check_reports_every_problem_in_one_pass_with_route_names_and_lines() {
    let text = r#"listen = "127.0.0.1:8080"
[source]
type = "file"
path = "no-such-secrets.json"

[[route]]
name = "payments"
path_prefix = "/payments"
upstream = "https://api.example.com"
secret_id = "prod/payments"
retry_on_401 = "yes"

[[route]]
name = "payments"
path_prefix = "/payments"
upstream = "ftp://api.example.com"
secret_id = "prod/other"
"#;
    let (code, out, err) = keyproxy(&["check"], Some(text), &[]);
    assert_eq!(code, 64, "{out}{err}");
    let problems: Vec<&str> = err.lines().skip(1).map(str::trim).collect();
    let expected = [
        "k.toml:4: source.path: cannot read ",
        "k.toml:11: route \"payments\" (#1) retry_on_401: invalid type: string \"yes\", expected a boolean",
        "k.toml:14: route \"payments\" (#2) name: \"payments\" is already the name of route #1",
        "k.toml:15: route \"payments\" (#2) path_prefix: \"/payments\" is already the path_prefix of route #1",
        "k.toml:16: route \"payments\" (#2) upstream: \"ftp://api.example.com\": scheme \"ftp\" is not http or https",
    ];
    assert_eq!(problems.len(), expected.len(), "{err}");
    for (p, e) in problems.iter().zip(expected) {
        assert!(p.contains(e), "expected {e:?} in {p:?}:\n{err}");
    }
    assert!(
        err.starts_with("keyproxy: invalid configuration ("),
        "{err}"
    );
    assert!(err.contains("5 problems"), "{err}");
}

#[test]
fn env_config_errors_name_the_variable() {
    let (code, _, err) = keyproxy(
        &["check"],
        None,
        &[
            ("KEYPROXY_UPSTREAM", "nope"),
            ("KEYPROXY_SECRET_ID", "s"),
            ("KEYPROXY_REFRESH_INTERVAL", "x"),
        ],
    );
    assert_eq!(code, 64);
    assert!(
        err.contains("KEYPROXY_UPSTREAM:") && err.contains("KEYPROXY_REFRESH_INTERVAL:"),
        "{err}"
    );
    let (code, _, err) = keyproxy(&[], None, &[]);
    assert_eq!(code, 64, "no config at all: {err}");
    assert!(err.contains("KEYPROXY_UPSTREAM"), "{err}");
}

#[test]
fn health_fails_when_nothing_listens() {
    let port = free_port();
    let (code, _, err) = keyproxy(
        &["health", "--admin", &format!("127.0.0.1:{port}")],
        None,
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("/healthz"), "{err}");
}

#[test]
fn each_subcommand_help_shows_only_what_applies_to_it() {
    let help = |cmd: &str| {
        let (code, out, err) = keyproxy(&[cmd, "--help"], None, &[]);
        assert_eq!(code, 0, "{cmd}: {err}");
        out
    };
    let run_config = "a single route comes from KEYPROXY_* variables";
    let check = help("check");
    assert!(check.contains("Config file to check"), "{check}");
    assert!(
        !check.contains(run_config) && !check.contains("--log"),
        "{check}"
    );
    let health = help("health");
    assert!(health.contains("whose admin_listen to check"), "{health}");
    assert!(
        !health.contains(run_config) && !health.contains("--log"),
        "{health}"
    );
    let rotate = help("rotate");
    assert!(rotate.contains("whose [aws] section"), "{rotate}");
    assert!(rotate.contains("--log-format"), "{rotate}");
    assert!(!rotate.contains(run_config), "{rotate}");
    for run in [help("run"), keyproxy(&["--help"], None, &[]).1] {
        assert!(
            run.contains(run_config) && run.contains("--log-format"),
            "{run}"
        );
    }
    // A subcommand's options go after it.
    let (code, _, err) = keyproxy(&["--config", "k.toml", "check"], None, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with '--config"), "{err}");
}

#[test]
fn logs_are_plain_text_when_stderr_is_not_a_terminal() {
    // The app port is taken: keyproxy logs the failure and exits.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = scratch("plain-logs");
    std::fs::write(dir.join("s.json"), r#"{"s": "k"}"#).expect("write");
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n[source]\ntype = \"file\"\npath = \"{}\"\n{ROUTE}",
        dir.join("s.json").display()
    );
    let (code, _, err) = keyproxy(&[], Some(&config), &[("TERM", "xterm-256color")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("keyproxy cannot run"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in a non-terminal stderr: {err:?}"
    );
}

/// The TOML inside a ConfigMap's `config.toml` key.
fn configmap_toml(path: &str) -> String {
    let cm = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .expect("configmap");
    let toml: String = cm
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("config.toml: |"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l).to_owned() + "\n")
        .collect();
    assert!(toml.contains("[[route]]"), "no TOML found in {path}");
    toml
}

#[test]
fn deploy_files_carry_valid_keyproxy_configs() {
    let root = env!("CARGO_MANIFEST_DIR");
    // Kubernetes: the TOML inside the ConfigMap.
    let toml = configmap_toml("deploy/kubernetes/configmap.yaml");
    let (code, out, err) = keyproxy(&["check"], Some(&toml), &[]);
    assert_eq!(code, 0, "ConfigMap config: {out}{err}");

    // The gateway: its config needs the app token, a file from the mounted Secret.
    let toml = configmap_toml("deploy/kubernetes/gateway/configmap.yaml");
    let (code, out, err) = keyproxy(&["check"], Some(&toml), &[]);
    assert_eq!(code, 64, "the gateway needs its token: {out}{err}");
    assert!(err.contains("app_auth.token_file"), "{err}");
    let token = scratch("gateway-token").join("token");
    std::fs::write(&token, "a-token-of-32-characters-or-more\n").expect("token");
    let mounted = "/etc/keyproxy-token/token";
    assert!(
        toml.contains(mounted),
        "the token file is where the Secret is mounted"
    );
    let toml = toml.replace(mounted, &token.to_string_lossy());
    let (code, out, err) = keyproxy(&["check"], Some(&toml), &[]);
    assert_eq!(code, 0, "gateway ConfigMap config: {out}{err}");

    // ECS: the keyproxy container's environment.
    let td: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/ecs/task-definition.json"))
            .expect("task definition"),
    )
    .expect("json");
    let container = td["containerDefinitions"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "keyproxy")
        .expect("keyproxy container");
    let env: Vec<(String, String)> = container["environment"]
        .as_array()
        .expect("environment")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().expect("name").to_owned(),
                e["value"].as_str().expect("value").to_owned(),
            )
        })
        .collect();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = keyproxy(&["check"], None, &env_refs);
    assert_eq!(code, 0, "task definition env: {out}{err}");
    assert!(out.contains("1 route"), "{out}");
}

#[test]
fn quickstart_cargo_run_picks_the_proxy_binary() {
    // README: `cargo run --release -- --config config/local.toml`; with two binaries in the
    // package, cargo needs `default-run` to know which one that is.
    let manifest = std::fs::read_to_string(format!("{}/Cargo.toml", env!("CARGO_MANIFEST_DIR")))
        .expect("Cargo.toml");
    assert!(
        manifest
            .lines()
            .any(|l| l.trim() == "default-run = \"keyproxy\""),
        "Cargo.toml lacks default-run"
    );
}

#[test]
fn check_names_each_credential_and_allow_mistake() {
    let text = format!(
        r#"{ROUTE}headers = {{ "X-Api-Key" = "{{secret.}}", "Bad Name" = "{{secret.x}}", "X-Api-Secret" = "{{secret.key_secret" }}
allow = ["/reports", "G(T /x", "GET reports", "GET /a/***", "GET /a/**x", "GET /ok"]

[[route]]
name = "b"
path_prefix = "/b"
upstream = "https://api.example.com"
secret_id = "s2"
basic_auth = {{ username = "{{secret.user}}" }}
"#
    );
    let (code, out, err) = keyproxy(&["check"], Some(&text), &[]);
    assert_eq!(code, 64, "{out}{err}");
    for part in [
        "route \"a\" (#1) headers.Bad Name: \"Bad Name\" is not a valid header name",
        "route \"a\" (#1) headers.X-Api-Key: \"{secret.}\": {secret.} names no field",
        "route \"a\" (#1) headers.X-Api-Secret: \"{secret.key_secret\": a {secret. placeholder is not closed",
        "route \"a\" (#1) allow[0]: \"/reports\": expected METHOD PATH",
        "route \"a\" (#1) allow[1]: \"G(T /x\": \"G(T\" is not a method",
        "route \"a\" (#1) allow[2]: \"GET reports\": the path must start with '/'",
        "route \"a\" (#1) allow[3]: \"GET /a/***\": \"***\": '*' (one segment) and '**' (any number) must be a whole segment",
        "route \"a\" (#1) allow[4]: \"GET /a/**x\"",
        "route \"b\" (#2) basic_auth.password: missing",
    ] {
        assert!(err.contains(part), "expected {part:?} in:\n{err}");
    }
    assert!(err.contains("9 problems"), "{err}");

    // The issue's example checks clean; unknown fields wait for run time.
    let good = r#"[source]
type = "file"
path = "secrets.json"

[[route]]
name = "ads"
path_prefix = "/ads"
upstream = "https://ads.example/api"
secret_id = "prod/ads/key"
headers = { "X-Api-Key" = "{secret.key_id}", "X-Api-Secret" = "{secret.key_secret}" }

[[route]]
name = "legacy"
path_prefix = "/legacy"
upstream = "https://legacy.example"
secret_id = "prod/legacy/login"
basic_auth = { username = "{secret.user}", password = "{secret.pass}" }
allow = ["GET /reports/*", "POST /reports/*/run", "GET /status"]
"#;
    let dir = scratch("cli-cred");
    std::fs::write(dir.join("secrets.json"), "{}").expect("write");
    let path = dir.join("k.toml");
    std::fs::write(&path, good).expect("write");
    let (code, out, err) = keyproxy(
        &["check", "--config", &path.display().to_string()],
        None,
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("headers x-api-key, x-api-secret"), "{out}");
    assert!(out.contains("basic auth"), "{out}");
}
