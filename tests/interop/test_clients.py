"""Real HTTP clients as the app, in front of keyproxy, against a few of the upstreams.

Each client sends its own Authorization (which keyproxy must replace) and an x-interop-id, and
the echo's JSON shows what reached the upstream. Routes: /h2 (http2 = true) in reverse mode, and
the forward-mode route (host = "<upstream>.interop.test") for curl -x.
"""

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass

import httpx
import pytest
import requests
import urllib.request

import appclient
import checks
from conftest import route_kind

UPSTREAMS = ["nginx", "nginx-plain", "hypercorn", "node"]
APP_KEY = "Bearer app-own-credential-must-be-replaced"
TIMEOUT = 20


@dataclass
class Got:
    status: int
    body: bytes
    request_id: str
    sent_body: bytes = b""
    http_version: str = ""


def app_headers(request_id):
    return {"Authorization": APP_KEY, "x-interop-id": request_id}


def url(stack, path):
    return stack.kp.url(f"{stack.route('h2').prefix}{path}")


def run(argv, timeout=TIMEOUT + 10):
    done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    assert done.returncode == 0, (
        f"{argv[0]} exited {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}")
    return done.stdout.decode(errors="replace")


def curl(tmp_path, target, extra=(), body=None):
    request_id = appclient.new_request_id()
    out = tmp_path / "curl-body"
    argv = ["curl", "-sS", "--max-time", str(TIMEOUT), "-o", str(out),
            "-w", "%{http_code} %{http_version}", *extra]
    for name, value in app_headers(request_id).items():
        argv += ["-H", f"{name}: {value}"]
    if body is not None:
        data = tmp_path / "curl-data"
        data.write_bytes(body)
        argv += ["-H", "Expect: 100-continue", "--data-binary", f"@{data}"]
    status, version = run(argv + [target]).split()
    return Got(int(status), out.read_bytes() if out.exists() else b"", request_id,
               body or b"", version)


def client_curl(stack, tmp_path):
    return curl(tmp_path, url(stack, "/echo/curl"))


def client_curl_http10(stack, tmp_path):
    return curl(tmp_path, url(stack, "/echo/curl10"), ["--http1.0"])


def client_curl_forward(stack, tmp_path):
    """HTTP_PROXY style: absolute-form request for the route's host."""
    return curl(tmp_path, f"http://{stack.forward_host()}/echo/forward",
                ["-x", f"http://127.0.0.1:{stack.kp.port}"])


def client_curl_h2c(stack, tmp_path):
    return curl(tmp_path, url(stack, "/echo/h2c"), ["--http2-prior-knowledge"])


def client_curl_post_expect(stack, tmp_path):
    return curl(tmp_path, url(stack, "/echo/curl-post"), body=os.urandom(300 * 1024))


def client_requests(stack, tmp_path):
    request_id = appclient.new_request_id()
    r = requests.get(url(stack, "/echo/requests"), headers=app_headers(request_id),
                     timeout=TIMEOUT)
    return Got(r.status_code, r.content, request_id)


def client_requests_post(stack, tmp_path):
    request_id = appclient.new_request_id()
    body = os.urandom(1024 * 1024)
    r = requests.post(url(stack, "/echo/requests-post"), data=body,
                      headers=app_headers(request_id), timeout=TIMEOUT)
    return Got(r.status_code, r.content, request_id, body)


def client_httpx(stack, tmp_path):
    request_id = appclient.new_request_id()
    with httpx.Client(timeout=TIMEOUT) as c:
        r = c.get(url(stack, "/echo/httpx"), headers=app_headers(request_id))
    return Got(r.status_code, r.content, request_id, http_version=r.http_version)


def client_httpx_h2c(stack, tmp_path):
    """httpx speaks HTTP/2 with prior knowledge to an http:// URL when HTTP/1.1 is off."""
    request_id = appclient.new_request_id()
    with httpx.Client(http1=False, http2=True, timeout=TIMEOUT) as c:
        r = c.get(url(stack, "/echo/httpx-h2c"), headers=app_headers(request_id))
    return Got(r.status_code, r.content, request_id, http_version=r.http_version)


def client_urllib(stack, tmp_path):
    request_id = appclient.new_request_id()
    req = urllib.request.Request(url(stack, "/echo/urllib"), headers=app_headers(request_id))
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return Got(r.status, r.read(), request_id)
    except urllib.error.HTTPError as e:
        return Got(e.code, e.read(), request_id)


NODE_FETCH = """
const [target, headers] = [process.argv[1], JSON.parse(process.argv[2])];
fetch(target, {headers, signal: AbortSignal.timeout(%d)})
  .then(async (r) => process.stdout.write(JSON.stringify({status: r.status, body: await r.text()})))
  .catch((e) => { console.error(e); process.exit(2); });
""" % (TIMEOUT * 1000)


def client_node_fetch(stack, tmp_path):
    request_id = appclient.new_request_id()
    out = json.loads(run(["node", "-e", NODE_FETCH, url(stack, "/echo/node-fetch"),
                          json.dumps(app_headers(request_id))]))
    return Got(out["status"], out["body"].encode(), request_id)


CLIENTS = {
    "curl": client_curl,
    "curl-http1.0": client_curl_http10,
    "curl-forward-proxy": client_curl_forward,
    "curl-h2c": client_curl_h2c,
    "curl-post-expect": client_curl_post_expect,
    "requests": client_requests,
    "requests-post-1mib": client_requests_post,
    "httpx": client_httpx,
    "httpx-h2c": client_httpx_h2c,
    "urllib": client_urllib,
    "node-fetch": client_node_fetch,
}


# The protocol the app and keyproxy spoke, where the client must not fall back to HTTP/1.1.
APP_PROTOCOL = {"curl-h2c": "2", "httpx-h2c": "HTTP/2"}


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("stack", UPSTREAMS, indirect=True)
def test_client(stack, client, tmp_path):
    got = CLIENTS[client](stack, tmp_path)
    assert got.status == 200, f"{client} got {got.status} {got.body[:300]!r}"
    if client in APP_PROTOCOL:
        assert got.http_version == APP_PROTOCOL[client], f"app spoke {got.http_version}"
    seen = json.loads(got.body)
    assert seen["run"] == stack.run
    if got.sent_body:
        assert seen["body_sha256"] == hashlib.sha256(got.sent_body).hexdigest()
    checks.check_seen(seen, stack, stack.route("h2"), got.request_id)


AB_REQUESTS = 200


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1"])
@pytest.mark.parametrize("stack", UPSTREAMS, indirect=True)
def test_ab(stack, http2):
    """ApacheBench, HTTP/1.0 keep-alive, 4 at a time, on the key-checking endpoint: every one
    of the requests must carry the route's key (else the echo answers 401, a non-2xx)."""
    route = stack.route(route_kind(http2))
    out = run(["ab", "-q", "-n", str(AB_REQUESTS), "-c", "4", "-k", "-s", "5",
               "-H", f"Authorization: {APP_KEY}",
               stack.kp.url(f"{route.prefix}/keyed/{route.secret}")], timeout=120)
    complete = re.search(r"Complete requests:\s+(\d+)", out)
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    assert complete and int(complete.group(1)) == AB_REQUESTS, out
    assert failed and int(failed.group(1)) == 0, out
    assert non2xx is None, out
