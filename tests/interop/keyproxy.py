"""keyproxy under test: its config, its file source, and the process.

The binary is target/debug/keyproxy (built by `cargo test --all-targets`, which scripts/test
runs first), or $KEYPROXY_BIN. It binds 127.0.0.1:0 for both listeners (so no other process can
hold its ports) and logs the addresses it got, as JSON lines, which are read back here.
"""

import json
import os
import time
import urllib.request
from dataclasses import dataclass

import harness

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_TIMEOUT = 20.0


def binary():
    return os.environ.get("KEYPROXY_BIN") or os.path.join(ROOT, "target", "debug", "keyproxy")


@dataclass
class Route:
    """One [[route]] table; `prefix` is its path_prefix (reverse mode)."""
    name: str
    upstream: str
    secret: str
    prefix: str = ""
    host: str = ""  # forward mode
    http2: bool = True
    query_param: str = ""
    oauth2: dict = None  # the [route.oauth2] table: keyproxy mints the token it injects

    def toml(self):
        lines = ["[[route]]", f'name = "{self.name}"']
        if self.prefix:
            lines.append(f'path_prefix = "{self.prefix}"')
        if self.host:
            lines.append(f'host = "{self.host}"')
        lines += [
            f'upstream = "{self.upstream}"',
            f'secret_id = "{self.secret}"',
            f"http2 = {'true' if self.http2 else 'false'}",
            # Every 401 may re-read the file: the replay cell rotates keys back to back.
            'refresh_cooldown = "0s"',
            'timeout = "15s"',
            'idle_timeout = "15s"',
        ]
        if self.query_param:
            lines.append(f'query_param = "{self.query_param}"')
        if self.oauth2:
            lines.append("[route.oauth2]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in self.oauth2.items()]
        return "\n".join(lines) + "\n"


class KeyStore:
    """The keys: keyproxy's secrets file, and the file each /keyed/NAME echo endpoint checks."""

    def __init__(self, secrets_path, keys_dir, prefix):
        self.secrets_path = secrets_path
        self.keys_dir = keys_dir
        self.prefix = prefix
        self.keys = {}
        self.generation = 0

    def add(self, secret):
        self.keys[secret] = self._fresh(secret)
        self._write_echo_key(secret)
        self._write_secrets()

    def current(self, secret):
        return self.keys[secret]

    def rotate(self, secret):
        """A rotation as the API sees it: the API takes the new key at once (and refuses the old
        one), Secrets Manager (here: the file) has it a moment later."""
        self.keys[secret] = self._fresh(secret)
        self._write_echo_key(secret)
        self._write_secrets()
        return self.keys[secret]

    def keyed_log(self, secret):
        """What the /keyed endpoint answered, oldest first ("ok" or "401")."""
        path = os.path.join(self.keys_dir, secret + ".log")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return f.read().split()

    def clear_keyed_log(self, secret):
        path = os.path.join(self.keys_dir, secret + ".log")
        if os.path.exists(path):
            os.remove(path)

    def _fresh(self, secret):
        self.generation += 1
        return f"{self.prefix}-{secret}-k{self.generation}"

    def _write_echo_key(self, secret):
        replace_file(os.path.join(self.keys_dir, secret), self.keys[secret])

    def _write_secrets(self):
        replace_file(self.secrets_path, json.dumps(self.keys))


def replace_file(path, text):
    """Readers see the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def config_text(routes, secrets_path, ca_pem):
    head = (
        'listen = "127.0.0.1:0"\n'
        'admin_listen = "127.0.0.1:0"\n'
        f'ca_bundle = "{ca_pem}"\n'
        "worker_threads = 2\n"
        # Stopped at the end of a stack: no need to wait for the app's idle connections.
        'drain_timeout = "1s"\n'
        "[source]\n"
        'type = "file"\n'
        f'path = "{secrets_path}"\n'
    )
    return head + "\n".join(r.toml() for r in routes)


class KeyProxy:
    """A running keyproxy; `port` is its app listener, `admin` its admin listener."""

    def __init__(self, name, directory, routes, keystore, ca_pem, wait_ready=True):
        """`keystore` needs only a `secrets_path`. With wait_ready=False, the listeners being up
        is enough (a route that cannot get its credential keeps /readyz at 503)."""
        self.name = name
        self.routes = {r.name: r for r in routes}
        path = os.path.join(directory, f"{name}.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(config_text(routes, keystore.secrets_path, ca_pem))
        self.config_path = path
        if not os.path.exists(binary()):
            raise FileNotFoundError(
                f"{binary()} not found: build it (cargo build) or set KEYPROXY_BIN")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("KEYPROXY_") and k != "RUST_LOG"}
        self.proc = harness.Process(
            name, [binary(), "--config", path, "--log-format", "json", "--log", "info"],
            os.path.join(directory, f"{name}.log"), env=env)
        try:
            self.port, self.admin = self._listeners()
            if wait_ready:
                self._wait_ready()
        except Exception:
            self.proc.stop()
            raise

    def _listeners(self):
        deadline = time.monotonic() + READY_TIMEOUT
        found = {}
        while time.monotonic() < deadline and len(found) < 2:
            if self.proc.exited():
                raise RuntimeError(f"keyproxy exited with {self.proc.popen.returncode}:\n"
                                   f"{self.proc.logs()}")
            for line in harness.tail(self.proc.log_path, 200).splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                fields = entry.get("fields", entry)
                message = fields.get("message", "")
                if message in ("app listener ready", "admin listener ready"):
                    found[message.split()[0]] = int(str(fields["addr"]).rsplit(":", 1)[1])
            time.sleep(0.05)
        if len(found) < 2:
            raise RuntimeError(f"keyproxy listeners not up in {READY_TIMEOUT:.0f} s:\n"
                               f"{self.proc.logs()}")
        return found["app"], found["admin"]

    def _wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz",
                                            timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise RuntimeError(f"keyproxy /readyz not 200 in {READY_TIMEOUT:.0f} s ({last}):\n"
                           f"{self.proc.logs()}")

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def logs(self):
        return self.proc.logs(60)

    def stop(self):
        self.proc.stop()
