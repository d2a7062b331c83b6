"""The matrix: every upstream x (http2 = true, http2 = false) x every cell.

The app side is a plain HTTP/1.1 client (http.client); test_clients.py varies the app instead.
"""

import hashlib
import os
import time
from urllib.parse import parse_qsl

import pytest

import appclient
import checks
import echo_app
import servers
from conftest import route_kind

APP_KEY = "Bearer app-own-credential-must-be-replaced"
# Sent by the app on every header-injection cell: keyproxy must replace it, not add beside it.
APP_AUTH = {"Authorization": APP_KEY}
MIB = 1024 * 1024


def cell_get(stack, route):
    reply = appclient.send(stack.kp.port, "GET", f"{route.prefix}/echo/get?a=1&b=two",
                           headers={**APP_AUTH, "X-App-Header": "kept"})
    seen = checks.echo_json(reply, stack)
    assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/echo/get", "a=1&b=two")
    assert checks.values(seen["headers"], "x-app-header") == ["kept"]
    checks.check_seen(seen, stack, route, reply.request_id)


def cell_head(stack, route):
    reply = appclient.send(stack.kp.port, "HEAD", f"{route.prefix}/echo/head",
                           headers=APP_AUTH)
    assert reply.status == 200, f"app got {reply.describe()}"
    assert reply.body == b""
    assert int(reply.header("content-length") or 0) > 0, "HEAD lost the GET's Content-Length"
    checks.check_summary(reply, stack, route, "HEAD")


def cell_status_204(stack, route):
    reply = appclient.send(stack.kp.port, "GET", f"{route.prefix}/status/204", headers=APP_AUTH)
    assert reply.status == 204, f"app got {reply.describe()}"
    assert reply.body == b""
    checks.check_summary(reply, stack, route, "GET")


def cell_post_1mib(stack, route):
    body = os.urandom(MIB)
    reply = appclient.send(stack.kp.port, "POST", f"{route.prefix}/echo/post", body=body,
                           headers={"Content-Type": "application/octet-stream", **APP_AUTH})
    seen = checks.echo_json(reply, stack)
    assert seen["body_len"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest(), "body changed on the way"
    checks.check_seen(seen, stack, route, reply.request_id)


def cell_chunked_body(stack, route):
    """Transfer-Encoding: chunked from the app: 16 chunks of 64 KiB."""
    pieces = [os.urandom(64 * 1024) for _ in range(16)]
    reply = appclient.send(stack.kp.port, "POST", f"{route.prefix}/echo/chunked",
                           body=iter(pieces), headers=APP_AUTH)
    seen = checks.echo_json(reply, stack)
    assert seen["body_len"] == MIB
    assert seen["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    checks.check_seen(seen, stack, route, reply.request_id)


def cell_expect_100(stack, route):
    body = os.urandom(300 * 1024)
    reply = appclient.send_expect_continue(stack.kp.port, f"{route.prefix}/echo/expect", body,
                                           headers=APP_AUTH.items())
    seen = checks.echo_json(reply, stack)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    checks.check_seen(seen, stack, route, reply.request_id)


STREAM_CHUNKS, STREAM_DELAY = 5, 0.25


def cell_stream(stack, route):
    """Each chunk must reach the app when the upstream sends it, not all at the end."""
    reply = appclient.send_timed(
        stack.kp.port, f"{route.prefix}/stream?n={STREAM_CHUNKS}&delay={STREAM_DELAY}",
        headers=APP_AUTH)
    assert reply.status == 200, f"app got {reply.describe()}"
    assert reply.body == b"".join(f"chunk {i}\n".encode() for i in range(STREAM_CHUNKS))
    first, last = reply.reads[0][0], reply.reads[-1][0]
    spread = (STREAM_CHUNKS - 1) * STREAM_DELAY
    assert last - first >= 0.6 * spread, (
        f"the {STREAM_CHUNKS} chunks, sent over {spread:.2f} s, arrived within "
        f"{last - first:.2f} s of each other (buffered): reads at {reply.reads}")
    checks.check_summary(reply, stack, route, "GET")


def cell_replay_401(stack, route):
    """The API switches to a new key; keyproxy, still sending the old one, gets 401, re-reads
    its source and replays once. The poll of the file (every second) may win the race and
    avoid the 401: then the rotation is done again, so that the replay is really exercised."""
    for _ in range(3):
        stack.keys.clear_keyed_log(route.secret)
        stack.keys.rotate(route.secret)
        reply = appclient.send(stack.kp.port, "GET", f"{route.prefix}/keyed/{route.secret}",
                               headers=APP_AUTH)
        seen = checks.echo_json(reply, stack)
        checks.check_seen(seen, stack, route, reply.request_id)
        tries = stack.keys.keyed_log(route.secret)
        if tries == ["401", "ok"]:
            return
        assert tries == ["ok"], f"the API answered {tries} (expected one 401, one replay)"
        time.sleep(0.3)
    pytest.fail("keyproxy always had the new key before the request; the replay never ran")


def cell_big_response_headers(stack, route):
    reply = appclient.send(stack.kp.port, "GET", f"{route.prefix}/bigheaders?count=3&size=7000",
                           headers=APP_AUTH)
    seen = checks.echo_json(reply, stack)
    for i in range(3):
        got = reply.header(f"x-big-{i}")
        assert got == echo_app.big_header_value(i, 7000), (
            f"x-big-{i}: {len(got or '')} bytes, expected the upstream's 7000")
    checks.check_seen(seen, stack, route, reply.request_id)


# keyproxy takes up to 100 request headers (more: 431); 90 plus the few every request has.
MANY = 90


def cell_many_request_headers(stack, route):
    sent = [(f"X-Many-{i:03d}", f"value-{i:03d}-" + "v" * 40) for i in range(MANY)]
    reply = appclient.send(stack.kp.port, "GET", f"{route.prefix}/echo/many",
                           headers=sent + list(APP_AUTH.items()))
    seen = checks.echo_json(reply, stack)
    got = [(n.lower(), v) for n, v in seen["headers"] if n.lower().startswith("x-many-")]
    # The order of fields with different names carries no meaning (RFC 9110, 5.3); proxies
    # (keyproxy's header map among them) may change it. Names and values must all arrive.
    assert sorted(got) == sorted((n.lower(), v) for n, v in sent), (
        f"{len(got)} of the {MANY} headers reached the upstream as sent")
    checks.check_seen(seen, stack, route, reply.request_id)


def cell_query_param(stack, route_h):
    """The query-parameter route of the same http2 setting: the app's own api_key replaced."""
    route = stack.route(route_kind(route_h.http2, query=True))
    reply = appclient.send(stack.kp.port, "GET",
                           f"{route.prefix}/echo/q?x=1&api_key=app-own&y=%20two")
    seen = checks.echo_json(reply, stack)
    pairs = parse_qsl(seen["query"], keep_blank_values=True)
    key = stack.keys.current(route.secret)
    assert [v for k, v in pairs if k == "api_key"] == [key], f"query at the upstream: {pairs}"
    assert [(k, v) for k, v in pairs if k != "api_key"] == [("x", "1"), ("y", " two")]
    checks.check_seen(seen, stack, route, reply.request_id)


CELLS = {
    "get": cell_get,
    "head": cell_head,
    "204": cell_status_204,
    "post-1mib": cell_post_1mib,
    "chunked-body": cell_chunked_body,
    "expect-100": cell_expect_100,
    "stream": cell_stream,
    "replay-401": cell_replay_401,
    "big-response-headers": cell_big_response_headers,
    "many-request-headers": cell_many_request_headers,
    "query-param": cell_query_param,
}


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1"])
@pytest.mark.parametrize("stack", list(servers.STARTERS), indirect=True)
def test_cell(stack, http2, cell):
    CELLS[cell](stack, stack.route(route_kind(http2)))
