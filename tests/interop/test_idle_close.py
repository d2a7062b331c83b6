"""An upstream that closes idle connections: Node's http2 server with a 1 s idle timeout sends
GOAWAY on an idle h2 session (and closes an idle HTTP/1.1 connection). keyproxy's pooled
connection is then dead; the app's next request must still get the upstream's answer."""

import time

import pytest

import appclient
import checks
import servers
from conftest import route_kind, start_stack

IDLE_MS = 1000
ROUNDS = 3


@pytest.fixture(scope="module")
def idle_stack(ctx, echo_backend):
    upstream = servers.start_node(ctx, name="node-idle", idle_ms=IDLE_MS)
    try:
        s = start_stack(ctx, upstream)
    except Exception:
        upstream.stop()
        raise
    yield s
    s.kp.stop()
    upstream.stop()


def closes_logged(stack, http2):
    text = open(stack.upstream.procs[0].log_path, encoding="utf-8").read()
    return text.count("GOAWAY" if http2 else "idle http/1.1 connection: closing")


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1"])
def test_request_after_idle_close(idle_stack, http2):
    stack = idle_stack
    route = stack.route(route_kind(http2))
    for round_no in range(ROUNDS):
        closes_before = closes_logged(stack, http2)
        reply = appclient.send(stack.kp.port, "GET", f"{route.prefix}/echo/idle{round_no}")
        seen = checks.echo_json(reply, stack)
        checks.check_seen(seen, stack, route, reply.request_id)
        time.sleep(IDLE_MS / 1000 + 0.7)
        assert closes_logged(stack, http2) > closes_before, (
            "the upstream did not close the idle connection; the cell tests nothing")
    reply = appclient.send(stack.kp.port, "GET", f"{route.prefix}/echo/after-idle")
    checks.check_seen(checks.echo_json(reply, stack), stack, route, reply.request_id)


RACE_OFFSETS_MS = range(-50, 51, 10)


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1"])
def test_request_racing_the_idle_close(idle_stack, http2):
    """Requests sent around the moment the upstream gives up the idle connection: the server
    has not processed them (GOAWAY's last stream id, or a close before any byte of an answer),
    so an idempotent GET may be sent again on a new connection; the app must not see a 502."""
    stack = idle_stack
    route = stack.route(route_kind(http2))
    failures = []
    for offset in RACE_OFFSETS_MS:
        first = appclient.send(stack.kp.port, "GET", f"{route.prefix}/echo/race")
        assert first.status == 200, f"app got {first.describe()}"
        time.sleep((IDLE_MS + offset) / 1000)
        reply = appclient.send(stack.kp.port, "GET", f"{route.prefix}/echo/race{offset}")
        if reply.status != 200:
            failures.append(f"{offset:+d} ms: {reply.describe()}")
    assert not failures, "requests at the idle timeout failed:\n" + "\n".join(failures)
