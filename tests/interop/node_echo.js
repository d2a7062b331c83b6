// The echo upstream on Node's own HTTP/2 stack: http2.createSecureServer({allowHTTP1: true}),
// h2 and http/1.1 by ALPN. Same endpoints and JSON as echo_app.py.
//
//   node node_echo.js PORT CERT KEY [IDLE_MS]
//
// IDLE_MS: a connection idle that long is closed by the server: an h2 session with
// session.close() (GOAWAY, then the socket closes), an HTTP/1.1 connection with a FIN. It is the
// usual behaviour of servers with an idle timeout, which a pooling client has to survive.
// Environment: INTEROP_RUN (marker on every answer), INTEROP_KEYS_DIR (for /keyed/NAME).
'use strict';
const http2 = require('node:http2');
const fs = require('node:fs');
const path = require('node:path');
const crypto = require('node:crypto');

const [port, certFile, keyFile, idleArg] = process.argv.slice(2);
const idleMs = Number(idleArg || 0);
const RUN = process.env.INTEROP_RUN || '';
const KEYS_DIR = process.env.INTEROP_KEYS_DIR || '';

// Headers in the order received. Over h2 the authority is the :authority pseudo-header; it is
// kept (as ":authority") so that a Host header sent beside it shows up as a second authority.
function receivedHeaders(req) {
  const out = [];
  const raw = req.rawHeaders;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i];
    if (name.startsWith(':') && name !== ':authority') continue;
    out.push([name, raw[i + 1]]);
  }
  return out;
}

function summary(seen) {
  const hosts = seen.headers.filter(([n]) => ['host', ':authority'].includes(n.toLowerCase())).map(([, v]) => v);
  const auths = seen.headers.filter(([n]) => n.toLowerCase() === 'authorization').map(([, v]) => v);
  return JSON.stringify({ method: seen.method, hosts, auths });
}

function bigHeaderValue(index, size) {
  const unit = `${index}abcdefghijklmnopqrstuvwxyz`;
  return unit.repeat(Math.floor(size / unit.length) + 1).slice(0, size);
}

function answer(res, seen, status, extra = {}) {
  const body = status === 204 || status === 304 ? '' : JSON.stringify(seen);
  const headers = { 'x-interop-run': RUN, 'x-echo-summary': summary(seen), 'content-type': 'application/json', ...extra };
  if (body) headers['content-length'] = Buffer.byteLength(body);
  res.writeHead(status, headers);
  res.end(seen.method === 'HEAD' ? undefined : body);
}

function handle(req, res) {
  const hash = crypto.createHash('sha256');
  let bodyLen = 0;
  req.on('data', (chunk) => { hash.update(chunk); bodyLen += chunk.length; });
  req.on('end', () => {
    const url = new URL(req.url, 'http://x');
    const seen = {
      run: RUN,
      method: req.method,
      path: url.pathname,
      query: url.search.slice(1),
      headers: receivedHeaders(req),
      body_len: bodyLen,
      body_sha256: hash.digest('hex'),
      protocol: req.httpVersion,
    };
    route(url, req, res, seen);
  });
}

function route(url, req, res, seen) {
  const p = url.pathname;
  if (p.startsWith('/stream')) {
    const n = Number(url.searchParams.get('n') || 5);
    const delay = Number(url.searchParams.get('delay') || 0.2) * 1000;
    res.writeHead(200, { 'x-interop-run': RUN, 'x-echo-summary': summary(seen), 'content-type': 'text/plain' });
    let i = 0;
    const next = () => {
      res.write(`chunk ${i}\n`);
      i += 1;
      if (i < n) setTimeout(next, delay); else res.end();
    };
    next();
  } else if (p.startsWith('/status/')) {
    answer(res, seen, Number(p.split('/')[2]));
  } else if (p.startsWith('/bigheaders')) {
    const count = Number(url.searchParams.get('count') || 3);
    const size = Number(url.searchParams.get('size') || 7000);
    const extra = {};
    for (let i = 0; i < count; i += 1) extra[`x-big-${i}`] = bigHeaderValue(i, size);
    answer(res, seen, 200, extra);
  } else if (p.startsWith('/keyed/')) {
    const name = p.split('/')[2];
    const want = `Bearer ${fs.readFileSync(path.join(KEYS_DIR, name), 'utf8').trim()}`;
    const auths = seen.headers.filter(([n]) => n.toLowerCase() === 'authorization').map(([, v]) => v);
    const ok = auths.length === 1 && auths[0] === want;
    fs.appendFileSync(path.join(KEYS_DIR, `${name}.log`), ok ? 'ok\n' : '401\n');
    answer(res, seen, ok ? 200 : 401);
  } else {
    answer(res, seen, 200);
  }
}

const server = http2.createSecureServer({
  cert: fs.readFileSync(certFile),
  key: fs.readFileSync(keyFile),
  allowHTTP1: true,
  maxHeaderListPairs: 512,
});
server.on('request', handle);
if (idleMs > 0) {
  server.on('session', (session) => {
    session.setTimeout(idleMs, () => {
      console.log('idle h2 session: GOAWAY');
      session.close();
    });
  });
  server.on('secureConnection', (socket) => {
    if (socket.alpnProtocol !== 'h2') {
      socket.setTimeout(idleMs, () => {
        console.log('idle http/1.1 connection: closing');
        socket.end();
      });
    }
  });
}
server.on('error', (e) => {
  console.error(`listen failed: ${e.message}`);
  process.exit(3);
});
server.listen(Number(port), '127.0.0.1', () => console.log(`listening on ${port}`));
