"""The echo upstream: an ASGI app that tells the test what reached the upstream end.

It is run by hypercorn in two ways: on plain HTTP/1.1 as the one backend behind every web
server front (nginx, Apache, HAProxy, Caddy, h2o), and on TLS with h2 + http/1.1 as an
upstream of its own.

    /echo...                    JSON {run, method, path, query, headers, body_len,
                                      body_sha256, protocol}
    /status/N                   status N (no body for 204/304)
    /stream?n=5&delay=0.2       n chunks, one every `delay` seconds, each sent as it is made
    /bigheaders?count=3&size=7000   `count` response headers of `size` bytes, plus the echo body
    /keyed/NAME                 401 unless Authorization is "Bearer <contents of KEYS_DIR/NAME>";
                                each try is appended to KEYS_DIR/NAME.log as "ok" or "401"

Every answer carries `x-interop-run` (proof that this process answered, not a stranger on the
port) and `x-echo-summary`, a compact JSON of what the request carried, so that HEAD and 204
answers, which have no body, can be checked too.

Run as a script: python echo_app.py --port N [--certfile F --keyfile F] (env INTEROP_RUN,
INTEROP_KEYS_DIR).
"""

import argparse
import asyncio
import hashlib
import json
import os
from urllib.parse import parse_qs

RUN = os.environ.get("INTEROP_RUN", "")
KEYS_DIR = os.environ.get("INTEROP_KEYS_DIR", "")


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    body_len, body_sha = await read_body(receive)
    seen = describe(scope, body_len, body_sha)
    path = scope["path"]
    if path.startswith("/stream"):
        await stream(scope, send, seen)
    elif path.startswith("/status/"):
        await answer(send, seen, int(path.split("/")[2]), scope["method"])
    elif path.startswith("/bigheaders"):
        await big_headers(scope, send, seen)
    elif path.startswith("/keyed/"):
        await keyed(send, seen, path.split("/")[2], scope["method"])
    else:
        await answer(send, seen, 200, scope["method"])


async def lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive):
    """Reads the whole request body, keeping only its length and hash."""
    digest = hashlib.sha256()
    length = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        digest.update(chunk)
        length += len(chunk)
        if not message.get("more_body", False):
            break
    return length, digest.hexdigest()


def describe(scope, body_len, body_sha):
    """What the request looked like at this end, headers in the order received."""
    return {
        "run": RUN,
        "method": scope["method"],
        "path": scope["path"],
        "query": scope["query_string"].decode("latin-1"),
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
        "body_len": body_len,
        "body_sha256": body_sha,
        "protocol": scope.get("http_version", ""),
    }


def summary_header(seen):
    """The few facts a body-less answer (HEAD, 204) still has to show."""
    hosts = [v for n, v in seen["headers"] if n.lower() in ("host", ":authority")]
    auths = [v for n, v in seen["headers"] if n.lower() == "authorization"]
    text = json.dumps({"method": seen["method"], "hosts": hosts, "auths": auths},
                      separators=(",", ":"))
    return (b"x-echo-summary", text.encode("latin-1"))


def base_headers(seen):
    return [(b"x-interop-run", RUN.encode()), summary_header(seen)]


async def answer(send, seen, status, method, extra_headers=()):
    body = b"" if status in (204, 304) else json.dumps(seen).encode()
    headers = base_headers(seen) + list(extra_headers)
    headers.append((b"content-type", b"application/json"))
    if status not in (204, 304):
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


async def stream(scope, send, seen):
    query = parse_qs(scope["query_string"].decode())
    n = int(query.get("n", ["5"])[0])
    delay = float(query.get("delay", ["0.2"])[0])
    headers = base_headers(seen) + [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for i in range(n):
        if i:
            await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": f"chunk {i}\n".encode(),
                    "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def big_header_value(index, size):
    """Deterministic so the test can compare what arrived byte for byte."""
    unit = f"{index}abcdefghijklmnopqrstuvwxyz"
    return (unit * (size // len(unit) + 1))[:size]


async def big_headers(scope, send, seen):
    query = parse_qs(scope["query_string"].decode())
    count = int(query.get("count", ["3"])[0])
    size = int(query.get("size", ["7000"])[0])
    extra = [(f"x-big-{i}".encode(), big_header_value(i, size).encode()) for i in range(count)]
    await answer(send, seen, 200, scope["method"], extra)


async def keyed(send, seen, name, method):
    """A key-checking API: the key it accepts is whatever the test last wrote to its file."""
    with open(os.path.join(KEYS_DIR, name), encoding="utf-8") as f:
        want = "Bearer " + f.read().strip()
    auths = [v for n, v in seen["headers"] if n.lower() == "authorization"]
    ok = auths == [want]
    with open(os.path.join(KEYS_DIR, name + ".log"), "a", encoding="utf-8") as f:
        f.write("ok\n" if ok else "401\n")
    await answer(send, seen, 200 if ok else 401, method)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile")
    parser.add_argument("--keyfile")
    args = parser.parse_args()

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = "-"
    config.errorlog = "-"
    # Large enough for the many-headers cell; the default (16 KiB) is what most servers use.
    config.h11_max_incomplete_size = 64 * 1024
    if args.certfile:
        config.certfile = args.certfile
        config.keyfile = args.keyfile
        config.alpn_protocols = ["h2", "http/1.1"]
    asyncio.run(serve(app, config))


if __name__ == "__main__":
    main()
