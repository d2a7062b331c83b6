"""Fixtures: one run context (CA, certificates, echo backend), and per upstream a stack of that
upstream plus a keyproxy whose routes point at it.

A stack is session-scoped and parametrized by upstream name, so pytest groups the tests of one
upstream together and runs one upstream (and its keyproxy) at a time.
"""

import os
import uuid
from dataclasses import dataclass

import pytest
import trustme

import keyproxy
import servers

# Routes of every stack. The /keyed endpoint of the echo checks the key of the route's secret.
ROUTE_KINDS = {
    # kind: (path_prefix, http2, query_param)
    "h2": ("/h2", True, ""),
    "h1": ("/h1", False, ""),
    "h2q": ("/h2q", True, "api_key"),
    "h1q": ("/h1q", False, "api_key"),
}


def route_kind(http2, query=False):
    return ("h2" if http2 else "h1") + ("q" if query else "")


@dataclass
class Stack:
    name: str
    run: str
    upstream: servers.Upstream
    kp: keyproxy.KeyProxy
    keys: keyproxy.KeyStore

    def route(self, kind):
        return self.kp.routes[kind]

    def forward_host(self):
        return self.kp.routes["fwd"].host

    def logs(self):
        return f"{self.kp.logs()}\n{self.upstream.logs()}"


@pytest.fixture(scope="session")
def ctx(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("interop"))
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: os.path.join(directory, f"{name}.pem")
             for name in ("ca", "cert", "key", "combined")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_pem.write_to_path(paths["key"])
    cert.private_key_and_cert_chain_pem.write_to_path(paths["combined"])
    with open(paths["cert"], "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    keys_dir = os.path.join(directory, "keys")
    os.makedirs(keys_dir)
    return servers.Context(
        run=uuid.uuid4().hex[:16], dir=directory, ca_pem=paths["ca"], cert_pem=paths["cert"],
        key_pem=paths["key"], combined_pem=paths["combined"], keys_dir=keys_dir)


@pytest.fixture(scope="session")
def echo_backend(ctx):
    proc, ctx.echo_port = servers.start_echo(ctx)
    yield proc
    proc.stop()


def start_upstream(ctx, name):
    """h2o is optional (it may be missing from a Debian release): skipped, saying why."""
    try:
        return servers.STARTERS[name](ctx)
    except (FileNotFoundError, RuntimeError) as e:
        if name == "h2o":
            pytest.skip(f"h2o cannot run here: {e}")
        raise


def start_stack(ctx, upstream):
    """keyproxy in front of `upstream`: one route per kind, plus a forward-mode route."""
    name = upstream.name
    keys = keyproxy.KeyStore(os.path.join(ctx.dir, f"secrets-{name}.json"), ctx.keys_dir,
                             ctx.run[:8])
    routes = []
    for kind, (prefix, http2, query_param) in ROUTE_KINDS.items():
        secret = f"{name}-{kind}"
        keys.add(secret)
        routes.append(keyproxy.Route(kind, upstream.url, secret, prefix=prefix, http2=http2,
                                     query_param=query_param))
    routes.append(keyproxy.Route("fwd", upstream.url, f"{name}-h2",
                                 host=f"{name}.interop.test"))
    kp = keyproxy.KeyProxy(f"keyproxy-{name}", ctx.dir, routes, keys, ctx.ca_pem)
    return Stack(name, ctx.run, upstream, kp, keys)


@pytest.fixture(scope="session")
def stack(request, ctx, echo_backend):
    upstream = start_upstream(ctx, request.param)
    try:
        s = start_stack(ctx, upstream)
    except Exception:
        upstream.stop()
        raise
    yield s
    s.kp.stop()
    upstream.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, show the logs of keyproxy and of the servers it talked to."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        if hasattr(value, "logs") and callable(value.logs) and hasattr(value, "kp"):
            report.sections.append(("server logs", value.logs()))
