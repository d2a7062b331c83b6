"""The real servers keyproxy is tested against, each with a minimal config of our own.

Web servers and proxies (nginx, Apache httpd, HAProxy, Caddy, h2o) are fronts: they terminate
TLS with h2 + http/1.1 (nginx also plain HTTP/1.1) and reverse-proxy over plain HTTP/1.1 to
the one shared echo backend (echo_app.py on hypercorn), passing on the Host they received and
the request headers unchanged, without buffering streamed responses. Each front adds:

- `x-interop-front: <name>-<run>` to its answers: proof that our process holds the port;
- `x-interop-front-proto` to the request it forwards: the protocol keyproxy spoke to it.

hypercorn (TLS) and Node's http2 server are upstreams of their own: the echo runs in them.
"""

import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
APACHE_MODULES = "/usr/lib/apache2/modules"


@dataclass
class Context:
    """What every server of one test run shares."""
    run: str
    dir: str
    ca_pem: str
    cert_pem: str  # server certificate chain for 127.0.0.1 / localhost
    key_pem: str
    combined_pem: str  # chain + key in one file (HAProxy)
    keys_dir: str
    echo_port: int = 0

    def path(self, name):
        return os.path.join(self.dir, name)

    def env(self):
        return dict(os.environ, INTEROP_RUN=self.run, INTEROP_KEYS_DIR=self.keys_dir)


@dataclass
class Upstream:
    """An upstream as keyproxy sees it."""
    name: str
    scheme: str
    port: int
    offers_h2: bool  # offers h2 by ALPN
    proto_from_front: bool  # the protocol keyproxy used is in x-interop-front-proto
    procs: list = field(default_factory=list)
    proto_log: str = ""  # else: an access log of "<x-interop-id> <protocol>" lines

    @property
    def url(self):
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def authority(self):
        return f"127.0.0.1:{self.port}"

    def logs(self):
        return "\n".join(p.logs() for p in self.procs)

    def stop(self):
        for p in self.procs:
            p.stop()


def front_markers(ctx, name):
    return {"x-interop-front": f"{name}-{ctx.run}", "x-interop-run": ctx.run}


def program(name):
    """The server's executable; Debian puts some in /usr/sbin, which a non-root PATH lacks."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (scripts/test installs it)")
    return path


def run_as_root(line):
    """A server started by root drops to an unprivileged user unless told otherwise; that user
    cannot read or write the run's private temp dir."""
    return line if os.geteuid() == 0 else ""


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# --- the echo ---------------------------------------------------------------------------------

def start_echo(ctx, name="echo", tls=False):
    """echo_app.py on hypercorn: plain HTTP/1.1 (the fronts' backend) or TLS with h2."""
    def spawn(ports):
        argv = [sys.executable, os.path.join(HERE, "echo_app.py"), "--port", str(ports[0])]
        if tls:
            argv += ["--certfile", ctx.cert_pem, "--keyfile", ctx.key_pem]
        return harness.Process(name, argv, ctx.path(f"{name}.log"), env=ctx.env())

    ca = ctx.ca_pem if tls else None
    proc, ports = harness.start_owned(
        name, 1, spawn, lambda p: harness.probe_http(p[0], {"x-interop-run": ctx.run}, ca))
    return proc, ports[0]


def start_hypercorn(ctx):
    proc, port = start_echo(ctx, "hypercorn", tls=True)
    return Upstream("hypercorn", "https", port, True, False, [proc])


# --- Node ------------------------------------------------------------------------------------

def start_node(ctx, name="node", idle_ms=0):
    def spawn(ports):
        argv = [program("node"), os.path.join(HERE, "node_echo.js"), str(ports[0]),
                ctx.cert_pem, ctx.key_pem, str(idle_ms)]
        return harness.Process(name, argv, ctx.path(f"{name}.log"), env=ctx.env())

    proc, ports = harness.start_owned(
        name, 1, spawn,
        lambda p: harness.probe_http(p[0], {"x-interop-run": ctx.run}, ctx.ca_pem))
    return Upstream(name, "https", ports[0], True, False, [proc])


# --- nginx -----------------------------------------------------------------------------------

NGINX_CONF = """\
{user}daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    client_max_body_size 0;
    large_client_header_buffers 8 32k;
    upstream echo {{ server 127.0.0.1:{echo}; keepalive 8; }}
    server {{
        {listen}
        ssl_certificate {cert};
        ssl_certificate_key {key};
        add_header x-interop-front nginx-{run} always;
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # $http_host is the Host header as received; over HTTP/2 nginx fills it from
            # :authority. (The default, $proxy_host, would hide what keyproxy sent.)
            proxy_set_header Host $http_host;
            proxy_set_header x-interop-front-proto $server_protocol;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
        }}
    }}
}}
"""


def start_nginx(ctx, tls=True):
    name = "nginx" if tls else "nginx-plain"

    def spawn(ports):
        d = ctx.path(name)
        os.makedirs(d, exist_ok=True)
        listen = (f"listen 127.0.0.1:{ports[0]} ssl http2;" if tls
                  else f"listen 127.0.0.1:{ports[0]};")
        conf = write(os.path.join(d, "nginx.conf"), NGINX_CONF.format(
            dir=d, echo=ctx.echo_port, listen=listen, cert=ctx.cert_pem, key=ctx.key_pem,
            run=ctx.run, user=run_as_root("user root;\n")))
        return harness.Process(name, [program("nginx"), "-p", d, "-c", conf],
                               ctx.path(f"{name}.log"),
                               extra_logs=[os.path.join(d, "nginx-error.log")])

    ca = ctx.ca_pem if tls else None
    markers = front_markers(ctx, "nginx")
    proc, ports = harness.start_owned(
        name, 1, spawn, lambda p: harness.probe_http(p[0], markers, ca))
    return Upstream(name, "https" if tls else "http", ports[0], tls, True, [proc])


# --- Apache httpd ----------------------------------------------------------------------------

APACHE_MODULE_LIST = [
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("headers_module", "mod_headers.so"),
    ("socache_shmcb_module", "mod_socache_shmcb.so"),
    ("ssl_module", "mod_ssl.so"),
    ("http2_module", "mod_http2.so"),
    ("proxy_module", "mod_proxy.so"),
    ("proxy_http_module", "mod_proxy_http.so"),
]

APACHE_CONF = """\
ServerRoot {dir}
{modules}
PidFile {dir}/apache.pid
DefaultRuntimeDir {dir}
ErrorLog {dir}/apache-error.log
LogLevel warn
Listen 127.0.0.1:{port}
ServerName 127.0.0.1
User www-data
Group www-data
LimitRequestFields 500
SSLSessionCache shmcb:{dir}/ssl_scache(512000)
<VirtualHost 127.0.0.1:{port}>
    SSLEngine on
    SSLCertificateFile {cert}
    SSLCertificateKeyFile {key}
    Protocols h2 http/1.1
    ProxyPreserveHost On
    ProxyAddHeaders Off
    ProxyPass / http://127.0.0.1:{echo}/ flushpackets=on
    Header always set x-interop-front apache-{run}
    RequestHeader set x-interop-front-proto "expr=%{{SERVER_PROTOCOL}}"
</VirtualHost>
"""


def start_apache(ctx):
    name = "apache"

    def spawn(ports):
        d = ctx.path(name)
        os.makedirs(d, exist_ok=True)
        modules = "\n".join(f"LoadModule {m} {APACHE_MODULES}/{f}" for m, f in APACHE_MODULE_LIST)
        conf = write(os.path.join(d, "httpd.conf"), APACHE_CONF.format(
            dir=d, modules=modules, port=ports[0], cert=ctx.cert_pem, key=ctx.key_pem,
            echo=ctx.echo_port, run=ctx.run))
        return harness.Process(name, [program("apache2"), "-f", conf, "-DFOREGROUND"],
                               ctx.path(f"{name}.log"),
                               extra_logs=[os.path.join(d, "apache-error.log")])

    markers = front_markers(ctx, name)
    proc, ports = harness.start_owned(
        name, 1, spawn, lambda p: harness.probe_http(p[0], markers, ctx.ca_pem))
    return Upstream(name, "https", ports[0], True, True, [proc])


# --- HAProxy ---------------------------------------------------------------------------------

HAPROXY_CONF = """\
global
    # Room for 3 x 7000-byte response headers and a few hundred request headers.
    tune.bufsize 65536
    tune.http.maxhdr 512
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend interop
    bind 127.0.0.1:{port} ssl crt {pem} alpn h2,http/1.1
    http-request set-header x-interop-front-proto %[req.ver]
    http-response set-header x-interop-front haproxy-{run}
    default_backend echo
backend echo
    server echo 127.0.0.1:{echo}
"""


def start_haproxy(ctx):
    name = "haproxy"

    def spawn(ports):
        conf = write(ctx.path("haproxy.cfg"), HAPROXY_CONF.format(
            port=ports[0], pem=ctx.combined_pem, echo=ctx.echo_port, run=ctx.run))
        return harness.Process(name, [program("haproxy"), "-f", conf, "-db"],
                               ctx.path(f"{name}.log"))

    markers = front_markers(ctx, name)
    proc, ports = harness.start_owned(
        name, 1, spawn, lambda p: harness.probe_http(p[0], markers, ctx.ca_pem))
    return Upstream(name, "https", ports[0], True, True, [proc])


# --- Caddy -----------------------------------------------------------------------------------

def caddy_config(ctx, port, data_dir):
    return {
        "admin": {"disabled": True},
        "storage": {"module": "file_system", "root": data_dir},
        "apps": {
            "http": {"servers": {"interop": {
                "listen": [f"127.0.0.1:{port}"],
                "protocols": ["h1", "h2"],
                "automatic_https": {"disable": True},
                "tls_connection_policies": [{"certificate_selection": {"any_tag": ["interop"]}}],
                "routes": [{"handle": [
                    {"handler": "headers",
                     "response": {"set": {"x-interop-front": [f"caddy-{ctx.run}"]}}},
                    {"handler": "reverse_proxy",
                     "upstreams": [{"dial": f"127.0.0.1:{ctx.echo_port}"}],
                     # -1: flush every write at once (streamed responses arrive as sent).
                     "flush_interval": -1,
                     "headers": {"request": {"set": {
                         "x-interop-front-proto": ["{http.request.proto}"]}}}},
                ]}],
            }}},
            "tls": {"certificates": {"load_files": [
                {"certificate": ctx.cert_pem, "key": ctx.key_pem, "tags": ["interop"]}]}},
        },
    }


def start_caddy(ctx):
    name = "caddy"

    def spawn(ports):
        d = ctx.path(name)
        os.makedirs(d, exist_ok=True)
        conf = write(os.path.join(d, "caddy.json"), json.dumps(caddy_config(ctx, ports[0], d)))
        # Caddy keeps state under HOME / XDG dirs: keep it in the run's temp dir.
        env = dict(os.environ, HOME=d, XDG_DATA_HOME=d, XDG_CONFIG_HOME=d)
        return harness.Process(name, [program("caddy"), "run", "--config", conf],
                               ctx.path(f"{name}.log"), env=env)

    markers = front_markers(ctx, name)
    proc, ports = harness.start_owned(
        name, 1, spawn, lambda p: harness.probe_http(p[0], markers, ctx.ca_pem))
    return Upstream(name, "https", ports[0], True, True, [proc])


# --- h2o -------------------------------------------------------------------------------------

H2O_CONF = """\
listen:
  host: 127.0.0.1
  port: {port}
  ssl:
    certificate-file: {cert}
    key-file: {key}
{user}error-log: {dir}/h2o-error.log
num-threads: 1
proxy.preserve-host: ON
proxy.emit-x-forwarded-headers: OFF
proxy.emit-via-header: OFF
# h2o 2.2 cannot put a variable into a forwarded request header, so the protocol keyproxy spoke
# is read from the access log, by the request's x-interop-id.
access-log:
  path: {dir}/h2o-access.log
  format: "%{{x-interop-id}}i %H"
hosts:
  default:
    paths:
      /:
        header.set: "x-interop-front: h2o-{run}"
        proxy.reverse.url: http://127.0.0.1:{echo}/
"""


def start_h2o(ctx):
    name = "h2o"

    def spawn(ports):
        d = ctx.path(name)
        os.makedirs(d, exist_ok=True)
        conf = write(os.path.join(d, "h2o.conf"), H2O_CONF.format(
            port=ports[0], cert=ctx.cert_pem, key=ctx.key_pem, dir=d, echo=ctx.echo_port,
            run=ctx.run, user=run_as_root("user: root\n")))
        return harness.Process(name, [program("h2o"), "-c", conf], ctx.path(f"{name}.log"),
                               extra_logs=[os.path.join(d, "h2o-error.log")])

    markers = front_markers(ctx, name)
    proc, ports = harness.start_owned(
        name, 1, spawn, lambda p: harness.probe_http(p[0], markers, ctx.ca_pem))
    return Upstream(name, "https", ports[0], True, False, [proc],
                    proto_log=os.path.join(ctx.path(name), "h2o-access.log"))


STARTERS = {
    "nginx": lambda ctx: start_nginx(ctx, tls=True),
    "nginx-plain": lambda ctx: start_nginx(ctx, tls=False),
    "apache": start_apache,
    "haproxy": start_haproxy,
    "caddy": start_caddy,
    "h2o": start_h2o,
    "hypercorn": start_hypercorn,
    "node": start_node,
}
