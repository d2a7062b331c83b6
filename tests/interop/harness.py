"""Processes for the interop tests: start on a port of our own, prove it is ours, stop by PID.

A port is picked by binding port 0 and releasing it, so another process may take it before our
server binds it. Every server is therefore started, then probed for this run's marker (a
response header that only our configuration adds); if the server exited (bind failed) or a
stranger answered, it is started again on new ports.
"""

import http.client
import os
import signal
import socket
import ssl
import subprocess
import time

START_ATTEMPTS = 4
START_TIMEOUT = 20.0


class NotYet(Exception):
    """The server does not answer yet (still starting)."""


class Stranger(Exception):
    """Something answered on the port, but not our server."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, lines=40):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"({e})"


class Process:
    """A process this test run started; its output goes to a log file in the run's temp dir."""

    def __init__(self, name, argv, log_path, env=None, cwd=None, extra_logs=()):
        self.name = name
        self.log_path = log_path
        self.extra_logs = list(extra_logs)
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, cwd=cwd)
        self.pid = self.popen.pid

    def exited(self):
        return self.popen.poll() is not None

    def stop(self, grace=5.0):
        """SIGTERM to our PID (each server stops its own workers), SIGKILL if it lingers."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(grace)
        self._log.close()

    def logs(self, lines=40):
        parts = [f"--- {self.name} (pid {self.pid}) {self.log_path}:\n{tail(self.log_path, lines)}"]
        for path in self.extra_logs:
            parts.append(f"--- {self.name} {path}:\n{tail(path, lines)}")
        return "\n".join(parts)


BIND_ERRORS = ("address already in use", "eaddrinuse", "could not bind", "cannot bind",
               "bind()", "failed to listen", "errno 98")


def lost_port(proc):
    """Whether the process's log says it could not bind (a race for the port: try others)."""
    text = "\n".join(tail(p, 200) for p in [proc.log_path] + proc.extra_logs).lower()
    return any(e in text for e in BIND_ERRORS)


def start_owned(name, nports, spawn, probe, attempts=START_ATTEMPTS, timeout=START_TIMEOUT):
    """Starts `spawn(ports) -> Process` on fresh ports until `probe(ports)` proves it is ours.

    probe raises NotYet while the server is starting and Stranger when another process holds a
    port. A server that exits before answering is started again on new ports when its log says
    the port was taken; any other exit, or no answer in `timeout` seconds, is a failure.
    """
    for attempt in range(1, attempts + 1):
        ports = [free_port() for _ in range(nports)]
        proc = spawn(ports)
        outcome, retry = wait_owned(proc, ports, probe, timeout)
        if outcome is None:
            return proc, ports
        proc.stop()
        if not retry or attempt == attempts:
            raise RuntimeError(f"could not start {name} on ports {ports}: {outcome}\n"
                               f"{proc.logs()}")
    raise AssertionError("unreachable")


def wait_owned(proc, ports, probe, timeout):
    """(None, _) once the probe passes, else (what went wrong, whether new ports may help)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.exited():
            return f"exited with status {proc.popen.returncode}", lost_port(proc)
        try:
            probe(ports)
            return None, False
        except NotYet:
            time.sleep(0.1)
        except Stranger as e:
            return f"another process answered: {e}", True
    return f"no answer within {timeout:.0f} s", False


def probe_http(port, markers, tls_ca=None, path="/echo/probe"):
    """GETs `path`: NotYet unless it answers, Stranger unless every header in `markers` has
    its value (the run's marker, added by our configuration only)."""
    if tls_ca:
        ctx = ssl.create_default_context(cafile=tls_ca)
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=3, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
    except (OSError, ssl.SSLError, http.client.HTTPException) as e:
        raise NotYet(str(e)) from e
    finally:
        conn.close()
    for name, want in markers.items():
        got = resp.getheader(name)
        if got != want:
            raise Stranger(f"port {port}: status {resp.status}, {name}: {got!r}, not {want!r}")
