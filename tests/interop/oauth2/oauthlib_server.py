"""oauthlib's BackendApplicationServer (client credentials grant, Bearer tokens) as an OAuth2
token endpoint for the interop tests, on the stdlib's http.server.

oauthlib leaves client authentication and storage to a RequestValidator; this one knows two
clients (given as JSON on the command line: {"basic": {"id", "secret"}, "post": {...}}), accepts
each only with its own method (HTTP Basic per RFC 6749 §2.3.1, or the client_id and
client_secret form fields), allows the scope "api:read", and appends every token it issues to a
JSON-lines file. Binds 127.0.0.1:0 and prints {"event": "listening", "port": N}.

    python oauthlib_server.py CLIENTS_JSON ISSUED_PATH
"""

import base64
import json
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from oauthlib.oauth2 import BackendApplicationServer, RequestValidator

SCOPES = ["api:read"]


class Client:
    def __init__(self, client_id, secret, method):
        self.client_id = client_id
        self.secret = secret
        self.method = method


class Validator(RequestValidator):
    def __init__(self, clients, issued_path):
        self.clients = {c.client_id: c for c in clients}
        self.issued_path = issued_path

    def client_authentication_required(self, request, *args, **kwargs):
        return True

    def authenticate_client(self, request, *args, **kwargs):
        auth = request.headers.get("Authorization", "")
        if auth[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(auth[6:].strip(), validate=True).decode("utf-8")
            except ValueError:
                return False
            client_id, sep, secret = decoded.partition(":")
            if not sep:
                return False
            # RFC 6749 §2.3.1: each is form-encoded before Basic.
            client_id = urllib.parse.unquote_plus(client_id)
            secret = urllib.parse.unquote_plus(secret)
            method = "client_secret_basic"
        elif request.client_secret is not None:
            client_id, secret, method = request.client_id, request.client_secret, \
                "client_secret_post"
        else:
            return False
        client = self.clients.get(client_id)
        if client is None or client.secret != secret or client.method != method:
            return False
        request.client = client
        request.auth_method = method
        request.client_id = client.client_id
        return True

    def validate_grant_type(self, client_id, grant_type, client, request, *args, **kwargs):
        return grant_type == "client_credentials"

    def validate_scopes(self, client_id, scopes, client, request, *args, **kwargs):
        return all(s in SCOPES for s in scopes)

    def get_default_scopes(self, client_id, request, *args, **kwargs):
        return SCOPES

    def save_bearer_token(self, token, request, *args, **kwargs):
        with open(self.issued_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"client_id": request.client_id,
                                "access_token": token["access_token"],
                                "scope": token.get("scope", " ".join(request.scopes or [])),
                                # What the client asked for (None: no scope parameter).
                                "requested_scope": request.scope,
                                "method": request.auth_method,
                                "expires_in": token.get("expires_in")}) + "\n")


def main():
    clients_arg, issued_path = sys.argv[1], sys.argv[2]
    given = json.loads(clients_arg)
    clients = [Client(given["basic"]["id"], given["basic"]["secret"], "client_secret_basic"),
               Client(given["post"]["id"], given["post"]["secret"], "client_secret_post")]
    server = BackendApplicationServer(Validator(clients, issued_path), token_expires_in=300)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8")
            uri = f"http://127.0.0.1:{self.server.server_port}{self.path}"
            if self.path != "/token":
                return self.answer(404, {}, '{"error": "not_found"}')
            headers, text, status = server.create_token_response(
                uri, http_method="POST", body=body, headers=dict(self.headers.items()))
            self.answer(status, headers, text)

        def answer(self, status, headers, text):
            data = (text or "").encode("utf-8")
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() != "content-length":
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            print(json.dumps({"event": "request", "line": fmt % args}), flush=True)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(json.dumps({"event": "listening", "port": httpd.server_port}), flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
