"""A key rotation on a laptop, step by step: run by scripts/rotation-demo (see README, Rotation).

moto plays Secrets Manager, `keyproxy echo --client-id ...` plays an API that issues its own keys
(and refuses a replaced key two seconds after the new one is issued), keyproxy sits in front of it
under a little load, and `keyproxy rotate` rotates the key. Each step is printed as it happens;
the run fails (exit 1) if any request through keyproxy fails.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import boto3

SECRET = "demo/payments/api"
MASTER = "demo/payments/master"
CLIENT_ID = "demo-client"
CLIENT_SECRET = "demo-client-secret"
GRACE = "2s"
CLIENTS = 4
PAUSE = 0.01  # seconds between two requests of one client: a little load, not a benchmark
# Dummy credentials: moto accepts any, but the AWS SDK (and the aws CLI) refuse to send a request
# without some.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
START = time.monotonic()


def say(text=""):
    print(text, flush=True)


def step(n, text):
    say(f"\n[{n}/6] {text}")


def at():
    return f"+{time.monotonic() - START:.1f}s"


def fingerprint(key):
    """As the development API and README show keys: sha256: and 4 hex digits."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:4]


def short(version):
    return version[:8]


class Process:
    """A child process whose stderr is read line by line; `wait_for` finds a line."""

    def __init__(self, name, argv, env=None):
        self.name = name
        self.lines = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, match, timeout=30):
        """The first result of `match(line)` that is not None, over past and future lines."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for line in self.lines[seen:]:
                    found = match(line)
                    if found is not None:
                        return found
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-20:])
                    sys.exit(f"rotation-demo: {self.name} did not start:\n{tail}")
                self.cond.wait(left)

    def json_lines(self):
        with self.cond:
            lines = list(self.lines)
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def json_field(message, field):
    def match(line):
        try:
            v = json.loads(line)
        except ValueError:
            return None
        return v.get(field) if v.get("message") == message else None

    return match


def http(method, url, body=None, headers=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def metric(admin, name, label=""):
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Load:
    """CLIENTS threads sending requests through keyproxy, alternating GET and POST."""

    def __init__(self, url):
        self.url = url
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        self.failed = []
        self.first_use = {}  # key number -> time it first came back in an answer
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def run(self, i):
        n = 0
        while not self.stop.is_set():
            n += 1
            if n % 2:
                status, body = http("GET", f"{self.url}/charges?client={i}")
            else:
                status, body = http(
                    "POST",
                    f"{self.url}/charges",
                    json.dumps({"amount": n, "client": i}).encode(),
                    {"content-type": "application/json"},
                )
            with self.lock:
                self.sent += 1
                if status != 200:
                    self.failed.append((status, body))
                else:
                    self.first_use.setdefault(body.get("key_number"), at())
            time.sleep(PAUSE)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keyproxy", required=True)
    parser.add_argument("--moto", required=True)
    parser.add_argument("--keep", action="store_true", help="leave everything running at the end")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="keyproxy-rotation-demo-")
    procs = []
    try:
        return run(args, work, procs)
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(args, work, procs):
    step(1, "Secrets Manager: moto, on a port of its own")
    moto = Process("moto", [args.moto, "-H", "127.0.0.1", "-p", "0"])
    procs.append(moto)
    port = moto.wait_for(lambda l: (m := re.search(r"Running on http://127.0.0.1:(\d+)", l)) and m.group(1))
    endpoint = f"http://127.0.0.1:{port}"
    say(f"      {endpoint}, with dummy credentials: AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing")
    sm = boto3.client(
        "secretsmanager",
        endpoint_url=endpoint,
        region_name=AWS_ENV["AWS_REGION"],
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    )

    step(2, "The API: keyproxy's development API, issuing keys of its own")
    api = Process(
        "keyproxy echo",
        [args.keyproxy, "echo", "--listen", "127.0.0.1:0", "--client-id", CLIENT_ID,
         "--client-secret", CLIENT_SECRET, "--grace", GRACE, "--log-format", "json"],
    )
    procs.append(api)
    api_addr = api.wait_for(json_field("development echo API ready (for development only)", "addr"))
    token_url = f"http://{api_addr}/oauth/token"
    say(f"      http://{api_addr}: POST /oauth/token mints a key for {CLIENT_ID}; every other")
    say(f"      request needs a live key; a key stops working {GRACE} after a newer one is issued")
    status, body = http(
        "POST", token_url,
        f"grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}".encode(),
        {"content-type": "application/x-www-form-urlencoded"},
    )
    assert status == 200, body
    key1 = body["access_token"]
    sm.create_secret(Name=MASTER, SecretString=json.dumps({
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token_url": token_url,
        "test_url": f"http://{api_addr}/v1/ping",
    }))
    v1 = sm.create_secret(Name=SECRET, SecretString=json.dumps(
        {"token": key1, "master_secret_id": MASTER}))["VersionId"]
    say(f"      secret {SECRET}: key #1 {fingerprint(key1)}, version {short(v1)} (AWSCURRENT)")
    say(f"      secret {MASTER}: client_id, client_secret, token_url, test_url")

    step(3, f"keyproxy in front of the API, {CLIENTS} clients sending requests through it")
    config = os.path.join(work, "demo.toml")
    with open(config, "w") as f:
        f.write(f"""listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[aws]
region = "{AWS_ENV['AWS_REGION']}"
endpoint_url = "{endpoint}"

[[route]]
name = "payments"
path_prefix = "/payments"
upstream = "http://{api_addr}/v1"
secret_id = "{SECRET}"
secret_field = "token"
refresh_interval = "1h"      # the new key arrives by the 401 replay, not by a scheduled refresh
refresh_cooldown = "1s"
""")
    kp = Process("keyproxy", [args.keyproxy, "--config", config, "--log-format", "json"], AWS_ENV)
    procs.append(kp)
    app = kp.wait_for(json_field("app listener ready", "addr"))
    admin = kp.wait_for(json_field("admin listener ready", "addr"))
    kp.wait_for(json_field("secret loaded", "version"))
    say(f"      app http://{app}/payments -> http://{api_addr}/v1, admin http://{admin} ({config})")
    load = Load(f"http://{app}/payments")
    time.sleep(1)
    say(f"      {at()} {load.sent} requests so far, every one with key #1")

    step(4, "keyproxy rotate --config demo.toml: the four steps of a rotation")
    rotate = subprocess.run(
        [args.keyproxy, "rotate", "--config", config, "--secret-id", SECRET,
         "--skip-rotation-enabled-check", "--log-format", "json"],
        env={**os.environ, **AWS_ENV}, capture_output=True, text=True, timeout=60,
    )
    if rotate.returncode != 0:
        sys.exit(f"rotation-demo: keyproxy rotate failed:\n{rotate.stderr}")
    v2 = rotate.stdout.strip()
    key2 = json.loads(sm.get_secret_value(SecretId=SECRET, VersionStage="AWSCURRENT")["SecretString"])["token"]
    for line in rotate.stderr.splitlines():
        try:
            v = json.loads(line)
        except ValueError:
            continue
        s, msg = v.get("step"), v.get("message", "")
        if s == "createSecret" and msg == "rotation step done":
            say(f"      createSecret: key #2 {fingerprint(key2)} minted at {token_url},")
            say(f"                    stored as version {short(v2)}, labelled AWSPENDING")
        elif s == "setSecret":
            say(f"      setSecret:    {v.get('reason')}")
        elif s == "testSecret" and msg == "rotation step done":
            say(f"      testSecret:   the AWSPENDING key answered 200 at http://{api_addr}/v1/ping")
        elif s == "finishSecret" and msg.startswith("rotation finished"):
            say(f"      finishSecret: AWSCURRENT moved {short(v.get('previous', ''))} -> {short(v2)};"
                f" {short(v1)} is now AWSPREVIOUS")
    stages = sm.describe_secret(SecretId=SECRET)["VersionIdsToStages"]
    shown = ", ".join(f"{short(k)} {' '.join(v)}" for k, v in sorted(stages.items()))
    say(f"      {at()} stages now: {shown}")
    current = sm.get_secret_value(SecretId=SECRET, VersionStage="AWSCURRENT")["VersionId"]
    say(f"      get-secret-value --version-stage AWSCURRENT: version {short(current)} (key #2)")
    bare = sm.get_secret_value(SecretId=SECRET)["VersionId"]
    if bare != current:
        say(f"      get-secret-value without --version-stage: version {short(bare)}, the OLD one:")
        say("      a moto quirk (AWS answers AWSCURRENT); always pass --version-stage AWSCURRENT")

    step(5, f"the API refuses key #1 {GRACE} after key #2 was issued; keyproxy replays")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and 2 not in load.first_use:
        time.sleep(0.05)
    time.sleep(1)
    load.finish()
    refused = [v for v in api.json_lines() if v.get("message") == "request refused: 401"]
    replayed = metric(admin, "keyproxy_replays_succeeded_total")
    attempted = metric(admin, "keyproxy_replays_attempted_total")
    fetches = metric(admin, "keyproxy_secret_fetches_total")
    loaded = [v for v in kp.json_lines() if v.get("message") == "secret loaded" and v.get("reason") != "refresh"]
    say(f"      the API answered 401 to key #1 {len(refused)} time(s); keyproxy fetched AWSCURRENT")
    if loaded:
        say(f"      ({loaded[0].get('version', '')[:8]}, reason: {loaded[0].get('reason')}) and replayed"
            f" {int(replayed)} of {int(attempted)} request(s) with key #2")
    say(f"      key #2 first came back in an answer at {load.first_use.get(2, 'never')};"
        f" GetSecretValue calls in all: {int(fetches)}")

    step(6, "result")
    say(f"      {load.sent} requests through keyproxy, {len(load.failed)} failed")
    for status, body in load.failed[:5]:
        say(f"      failed: {status} {body}")
    ok = not load.failed and 2 in load.first_use
    if args.keep:
        say("\nStill running (Ctrl-C stops everything). To look around:")
        say(f"  curl http://{app}/payments/charges")
        say(f"  curl http://{admin}/readyz")
        say(f"  AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing aws --endpoint-url {endpoint} \\")
        say(f"    --region us-east-1 secretsmanager get-secret-value --secret-id {SECRET} --version-stage AWSCURRENT")
        say(f"  AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing {args.keyproxy} rotate \\")
        say(f"    --config {config} --secret-id {SECRET} --skip-rotation-enabled-check")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
