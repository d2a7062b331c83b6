"""OAuth2 token endpoints nobody here wrote, for test_oauth2.py: node-oidc-provider (npm, in
oauth2/node_modules, installed by scripts/test) and oauthlib (PyPI, tests/requirements.txt).

Each binds 127.0.0.1:0 itself and reports its port as a JSON line on stdout
({"event": "listening", "port": N}), which is read back here: no port race.
"""

import base64
import importlib.util
import json
import os
import shutil
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
OAUTH2_DIR = os.path.join(HERE, "oauth2")
START_TIMEOUT = 20.0
SCOPE = "api:read"


class Unavailable(Exception):
    """The server's package is not installed here (scripts/test installs it)."""


@dataclass
class TokenServer:
    name: str
    proc: harness.Process
    port: int
    clients: dict  # "basic" / "post" -> {"id", "secret"}
    issued_path: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def token_url(self):
        return f"http://127.0.0.1:{self.port}/token"

    def events(self, kind):
        """The JSON lines of the server's log with this `event`."""
        found = []
        for line in harness.tail(self.proc.log_path, 100000).splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == kind:
                found.append(entry)
        return found

    def logs(self):
        return self.proc.logs(60)

    def stop(self):
        self.proc.stop()


def wait_listening(proc, name):
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for line in harness.tail(proc.log_path, 200).splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("event") == "listening":
                return int(entry["port"])
        if proc.exited():
            raise RuntimeError(f"{name} exited with {proc.popen.returncode}:\n{proc.logs()}")
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"{name} did not report its port in {START_TIMEOUT:.0f} s:\n{proc.logs()}")


def start_oidc_provider(ctx, clients):
    node = shutil.which("node")
    if node is None:
        raise Unavailable("node is not installed (Debian nodejs)")
    if not os.path.isdir(os.path.join(OAUTH2_DIR, "node_modules", "oidc-provider")):
        raise Unavailable("oidc-provider is not installed: npm ci --prefix tests/interop/oauth2")
    proc = harness.Process(
        "oidc-provider", [node, os.path.join(OAUTH2_DIR, "oidc_provider.js"), json.dumps(clients)],
        ctx.path("oidc-provider.log"), cwd=OAUTH2_DIR)
    return TokenServer("oidc-provider", proc, wait_listening(proc, "oidc-provider"), clients)


def start_oauthlib(ctx, clients):
    if importlib.util.find_spec("oauthlib") is None:
        raise Unavailable("oauthlib is not installed (tests/requirements.txt)")
    issued = ctx.path("oauthlib-issued.jsonl")
    proc = harness.Process(
        "oauthlib", [sys.executable, os.path.join(OAUTH2_DIR, "oauthlib_server.py"),
                     json.dumps(clients), issued],
        ctx.path("oauthlib.log"))
    return TokenServer("oauthlib", proc, wait_listening(proc, "oauthlib"), clients, issued)


STARTERS = {"oidc-provider": start_oidc_provider, "oauthlib": start_oauthlib}


def issued_tokens(server):
    """oauthlib: what its RequestValidator saved, oldest first."""
    if not os.path.exists(server.issued_path):
        return []
    with open(server.issued_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def introspect(server, auth, token):
    """oidc-provider: RFC 7662 introspection of `token`, as the client `auth` that minted it."""
    client = server.clients[auth]
    form = {"token": token}
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if auth == "basic":
        pair = (urllib.parse.quote_plus(client["id"]) + ":" +
                urllib.parse.quote_plus(client["secret"]))
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        form.update(client_id=client["id"], client_secret=client["secret"])
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}/token/introspection",
                                 data=urllib.parse.urlencode(form).encode(), headers=headers,
                                 method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())
