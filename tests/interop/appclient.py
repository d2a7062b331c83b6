"""The app's side of a cell: one HTTP/1.1 request to keyproxy on a new connection (http.client),
with a time limit on every step."""

import http.client
import json
import select
import time
import uuid
from dataclasses import dataclass, field

TIMEOUT = 20.0


@dataclass
class Reply:
    status: int
    headers: list
    body: bytes
    request_id: str = ""
    reads: list = field(default_factory=list)  # (seconds since the request, bytes) per read

    def header(self, name):
        values = self.all(name)
        return values[0] if values else None

    def all(self, name):
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)

    def describe(self):
        """Status, keyproxy's error kind if it answered itself, and the start of the body."""
        kind = self.header("x-keyproxy-error")
        text = self.body[:300].decode("utf-8", "replace")
        return f"{self.status}" + (f" x-keyproxy-error={kind}" if kind else "") + f" {text!r}"


def new_request_id():
    return uuid.uuid4().hex


def send(port, method, path, headers=(), body=None, timeout=TIMEOUT):
    """`body` may be bytes (Content-Length) or an iterable of bytes (chunked)."""
    request_id = new_request_id()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"x-interop-id": request_id, **dict(headers)})
        return read_reply(conn.getresponse(), request_id)
    finally:
        conn.close()


def read_reply(resp, request_id, started=None):
    reads = []
    chunks = []
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        if started is not None:
            reads.append((time.monotonic() - started, len(chunk)))
        chunks.append(chunk)
    return Reply(resp.status, resp.getheaders(), b"".join(chunks), request_id, reads)


def send_timed(port, path, headers=(), timeout=TIMEOUT):
    """A GET whose reply records when each piece of the body arrived."""
    request_id = new_request_id()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        started = time.monotonic()
        conn.request("GET", path, headers={"x-interop-id": request_id, **dict(headers)})
        return read_reply(conn.getresponse(), request_id, started)
    finally:
        conn.close()


def send_expect_continue(port, path, body, headers=(), timeout=TIMEOUT):
    """A POST with `Expect: 100-continue`, as curl and many HTTP libraries send large bodies:
    the head alone, then the body once 100 Continue came (or after a second without one)."""
    request_id = new_request_id()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest("POST", path)
        for name, value in [("x-interop-id", request_id), ("Expect", "100-continue"),
                            ("Content-Length", str(len(body))), *headers]:
            conn.putheader(name, value)
        conn.endheaders()
        # getresponse() skips the 100 Continue itself; here we only wait for it to arrive.
        select.select([conn.sock], [], [], 1.0)
        conn.send(body)
        return read_reply(conn.getresponse(), request_id)
    finally:
        conn.close()
