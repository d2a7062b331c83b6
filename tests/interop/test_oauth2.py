"""keyproxy's OAuth2 client credentials mint against real token endpoints nobody here wrote:
node-oidc-provider and oauthlib (token_servers.py), each with a client_secret_basic and a
client_secret_post client.

Per server and `client_auth`: requests through keyproxy reach the echo (the recording upstream)
with `Authorization: Bearer <token>`, the token is one the server issued to that client for the
scope keyproxy asked for, and one mint serves every request. A wrong client secret gives the app
keyproxy's 503 `no_key` naming the endpoint's `invalid_client`.
"""

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

import checks
import keyproxy
import token_servers

SERVERS = list(token_servers.STARTERS)
AUTHS = ["basic", "post"]
REQUESTS = 5
REFUSAL_WAIT = 15.0


@dataclass
class OAuthStack:
    server: token_servers.TokenServer
    kp: keyproxy.KeyProxy

    def logs(self):
        return f"{self.kp.logs()}\n{self.server.logs()}"


class Secrets:
    """keyproxy's `file` source: secret id -> the client credentials as a JSON SecretString."""

    def __init__(self, path, secrets):
        self.secrets_path = path
        keyproxy.replace_file(path, json.dumps(
            {sid: json.dumps({"client_id": c["id"], "client_secret": c["secret"]})
             for sid, c in secrets.items()}))


def oauth2_routes(ctx, server, secret_of):
    return [keyproxy.Route(
        auth, f"http://127.0.0.1:{ctx.echo_port}", secret_of(auth), prefix=f"/{auth}",
        oauth2={"token_url": server.token_url, "scope": token_servers.SCOPE,
                "client_auth": auth})
        for auth in AUTHS]


def start_server(ctx, name):
    run = ctx.run[:8]
    clients = {auth: {"id": f"kp-{auth}-{run}", "secret": f"s3cr3t {auth}+/{run}"}
               for auth in AUTHS}
    try:
        return token_servers.STARTERS[name](ctx, clients)
    except token_servers.Unavailable as e:
        pytest.skip(f"{name} cannot run here: {e}")


@pytest.fixture(scope="module", params=SERVERS)
def oauth(request, ctx, echo_backend):
    name = request.param
    server = start_server(ctx, name)
    try:
        secrets = Secrets(ctx.path(f"secrets-oauth2-{name}.json"),
                          {f"oauth2-{name}-{a}": server.clients[a] for a in AUTHS})
        kp = keyproxy.KeyProxy(f"keyproxy-oauth2-{name}", ctx.dir,
                               oauth2_routes(ctx, server, lambda a: f"oauth2-{name}-{a}"),
                               secrets, ctx.ca_pem)
    except Exception:
        server.stop()
        raise
    yield OAuthStack(server, kp)
    kp.stop()
    server.stop()


def get(url):
    """(status, headers, body) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def issued_to(stack, auth):
    """The tokens the server issued to the client `auth`, from its own records: oauthlib's
    validator file, oidc-provider's `client_credentials.saved` events (logged as "issued")."""
    client_id = stack.server.clients[auth]["id"]
    if stack.server.name == "oauthlib":
        return [t for t in token_servers.issued_tokens(stack.server)
                if t["client_id"] == client_id]
    return [e for e in stack.server.events("issued") if e["client_id"] == client_id]


@pytest.mark.parametrize("auth", AUTHS)
def test_bearer_token_from_the_server(oauth, ctx, auth):
    tokens = []
    for i in range(REQUESTS):
        status, headers, body = get(oauth.kp.url(f"/{auth}/echo/oauth2?i={i}"))
        assert status == 200, f"app got {status} x-keyproxy-error=" \
            f"{headers.get('x-keyproxy-error')} {body[:300]!r}"
        assert headers.get("x-interop-run") == ctx.run, "the answer is not the echo's"
        seen = json.loads(body)
        auths = checks.values(seen["headers"], "authorization")
        assert len(auths) == 1 and auths[0].startswith("Bearer "), \
            f"Authorization at the upstream: {auths}"
        tokens.append(auths[0][len("Bearer "):])
    assert len(set(tokens)) == 1, f"{len(set(tokens))} different tokens for {REQUESTS} requests"
    token = tokens[0]

    issued = issued_to(oauth, auth)
    assert len(issued) == 1, f"{len(issued)} mints for {REQUESTS} requests: {issued}"
    if oauth.server.name == "oauthlib":
        assert issued[0]["access_token"] == token, "the upstream got a token oauthlib never issued"
        assert issued[0]["requested_scope"] == token_servers.SCOPE, \
            f"scope keyproxy sent: {issued[0]['requested_scope']!r}"
        # The validator accepts each client only with its own method; recorded all the same.
        assert issued[0]["method"] == f"client_secret_{auth}", issued[0]
    else:
        info = token_servers.introspect(oauth.server, auth, token)
        assert info.get("active") is True, f"oidc-provider does not know the token: {info}"
        assert info.get("client_id") == oauth.server.clients[auth]["id"], info
        # oidc-provider grants a client credentials token only the scopes asked for.
        assert info.get("scope") == token_servers.SCOPE, f"scope of the token: {info}"
        assert info.get("token_type") == "Bearer", info
        # oidc-provider takes either method from either client: how did keyproxy authenticate?
        minted = [e for e in oauth.server.events("token_request")
                  if e["client_id"] == oauth.server.clients[auth]["id"] and e["status"] == 200]
        assert len(minted) == 1, f"token requests of {auth}: {minted}"
        used = (minted[0]["basic"], minted[0]["form_secret"])
        assert used == (auth == "basic", auth == "post"), \
            f"client_auth = {auth!r}, but the token request had {minted[0]}"
        assert minted[0]["scope"] == token_servers.SCOPE, minted[0]


@pytest.fixture(scope="module")
def refused(oauth, ctx):
    """A second keyproxy on the same server whose routes hold a wrong client secret."""
    name = oauth.server.name
    wrong = {a: {"id": c["id"], "secret": c["secret"] + "-wrong"}
             for a, c in oauth.server.clients.items()}
    secrets = Secrets(ctx.path(f"secrets-oauth2-{name}-wrong.json"),
                      {f"oauth2-{name}-{a}-wrong": wrong[a] for a in AUTHS})
    kp = keyproxy.KeyProxy(f"keyproxy-oauth2-{name}-wrong", ctx.dir,
                           oauth2_routes(ctx, oauth.server, lambda a: f"oauth2-{name}-{a}-wrong"),
                           secrets, ctx.ca_pem, wait_ready=False)
    yield OAuthStack(oauth.server, kp), wrong
    kp.stop()


@pytest.mark.parametrize("auth", AUTHS)
def test_wrong_client_secret_is_503_no_key(refused, auth):
    stack, wrong = refused
    deadline = time.monotonic() + REFUSAL_WAIT
    while True:
        status, headers, body = get(stack.kp.url(f"/{auth}/echo/refused"))
        text = body.decode("utf-8", "replace")
        if "invalid_client" in text or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 503 and headers.get("x-keyproxy-error") == "no_key", \
        f"app got {status} x-keyproxy-error={headers.get('x-keyproxy-error')} {text[:300]!r}"
    assert "invalid_client" in text and stack.server.token_url in text, \
        f"503 body does not name the endpoint's refusal: {text[:400]!r}"
    assert wrong[auth]["secret"] not in text and "s3cr3t" not in text, "client secret in the body"
