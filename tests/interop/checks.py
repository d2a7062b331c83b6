"""What every cell checks: what the upstream received and what the app got back."""

import json
import time

import harness


def values(seen_headers, *names):
    names = {n.lower() for n in names}
    return [v for n, v in seen_headers if n.lower() in names]


def echo_json(reply, stack, status=200):
    """The echo's JSON, after checking the app got `status` from the upstream (not keyproxy)."""
    assert reply.status == status, f"app got {reply.describe()}"
    assert reply.header("x-keyproxy-error") is None, f"app got {reply.describe()}"
    seen = reply.json()
    assert seen["run"] == stack.run, "the answer is not from this run's echo"
    return seen


def summary(reply):
    """The echo's x-echo-summary: method, hosts, auths (for answers without a body)."""
    text = reply.header("x-echo-summary")
    assert text, f"no x-echo-summary: the echo did not answer ({reply.describe()})"
    return json.loads(text)


def expected_auths(stack, route):
    if route.query_param:
        return []
    return [f"Bearer {stack.keys.current(route.secret)}"]


def check_credential_and_host(hosts, auths, stack, route):
    """Exactly one authority (Host or :authority), the upstream's own; exactly one credential
    header, keyproxy's (the app's own replaced); none at all on a query-parameter route."""
    want_host = stack.upstream.authority
    assert hosts == [want_host], (
        f"authority at the upstream: {hosts}, expected exactly [{want_host!r}]")
    want_auths = expected_auths(stack, route)
    assert auths == want_auths, f"Authorization at the upstream: {auths}, expected {want_auths}"


def check_seen(seen, stack, route, request_id=None):
    check_credential_and_host(values(seen["headers"], "host", ":authority"),
                              values(seen["headers"], "authorization"), stack, route)
    if request_id is not None:
        check_protocol(seen, stack, route, request_id)


def check_summary(reply, stack, route, method):
    s = summary(reply)
    assert s["method"] == method, f"method at the upstream: {s['method']}"
    check_credential_and_host(s["hosts"], s["auths"], stack, route)


def expected_protocol(stack, route):
    """HTTP/2 exactly when the route allows it and the upstream offers it by ALPN."""
    return "2" if route.http2 and stack.upstream.offers_h2 else "1.1"


def normalize_protocol(text):
    text = text.strip().upper().removeprefix("HTTP/")
    return "2" if text in ("2", "2.0") else text


def protocol_used(seen, stack, request_id):
    """The protocol keyproxy spoke to the upstream, as the upstream itself saw it."""
    up = stack.upstream
    if up.proto_from_front:
        found = values(seen["headers"], "x-interop-front-proto")
        assert len(found) == 1, f"x-interop-front-proto at the echo: {found}"
        return normalize_protocol(found[0])
    if up.proto_log:
        return normalize_protocol(protocol_from_log(up.proto_log, request_id))
    return normalize_protocol(seen["protocol"])


def protocol_from_log(path, request_id, wait=2.0):
    """The front writes its access log line after answering: allow it a moment."""
    deadline = time.monotonic() + wait
    while True:
        for line in harness.tail(path, 500).splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == request_id:
                return parts[1]
        if time.monotonic() > deadline:
            raise AssertionError(f"request {request_id} not in {path}")
        time.sleep(0.05)


def check_protocol(seen, stack, route, request_id):
    got = protocol_used(seen, stack, request_id)
    want = expected_protocol(stack, route)
    assert got == want, (
        f"keyproxy spoke HTTP/{got} to the upstream; expected HTTP/{want} "
        f"(route http2 = {str(route.http2).lower()})")
