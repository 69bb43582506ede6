"""A real sticky reverse proxy in front of several `streamlit run` servers: Debian's haproxy
(`apt-get install -y haproxy`), started on a free port of 127.0.0.1 and stopped afterwards.

    with haproxy([server.url for server in servers]) as proxy:
        ...  # a browser (or bench.simulate's student) opens proxy.url

A lecture hall's proxy (README: Run a lecture hall), in the foreground until Ctrl-C:

    python -m harness.proxy --listen 0.0.0.0:8080 8501 8502 8503

What it does, and why:
- Sticky by a cookie the proxy inserts (PEFT_SERVER=s<i>), not by the client's address: a
  class behind one NAT, or every simulated student on 127.0.0.1, is one address, and
  `balance source` would seat the whole room on one server. A new visitor (no cookie) goes
  to the server with the fewest connections (leastconn: a websocket is one long connection,
  so the count is the number of open pages); its page's own requests, its websocket and a
  reconnect then stay there (a Streamlit session, its media files and its cookies live in
  one server's memory).
- Websockets pass through (HTTP/1.1 Upgrade; `timeout tunnel` keeps an idle one open).
- X-Forwarded-For is set to the peer's address, replacing whatever the client sent (the
  app's per-address run cap reads it; a client must not choose its own address).
- `static=True` (the lecture-hall proxy): the app's static files (9 MB of JavaScript, fonts and
  styles per first visit, which Streamlit sends uncompressed) are compressed once and kept in
  the proxy's memory: the frontend keeps a cache of the static files (`cache-use` before any
  backend is chosen), the backend compresses (gzip), so the cache stores the compressed bytes
  (its `Vary: Accept-Encoding` answered by `process-vary`) and the web servers send each file
  once; every other response (the page, its JSON, never the websocket) is compressed too.
"""
import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from harness.servers import free_port, stop_group, wait_for_port

HAPROXY = "/usr/sbin/haproxy"
COOKIE = "PEFT_SERVER"

CONFIG = """\
global
    maxconn 4000
    # no `daemon`: haproxy stays this process's child, in the foreground (-db)
{global_extra}
defaults
    mode http
    option http-server-close
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout tunnel 2h
    timeout http-request 30s

frontend class
    bind {bind}
    http-request set-header X-Forwarded-For %[src]
{frontend_extra}    default_backend streamlit

backend streamlit
    balance leastconn
    cookie {cookie} insert indirect nocache httponly
{compression}{servers}
{sections}"""

COMPRESSION = ("    compression algo gzip\n"
               "    compression type text/html text/css text/plain application/javascript "
               "text/javascript application/json image/svg+xml font/ttf\n")

# Streamlit's static files are named by their content's hash and sent with max-age one year;
# the largest (the chart library) is 4.7 MB before compression. haproxy 2.6 caches a response
# before it compresses it in the same proxy, so a second proxy inside this one (`gzip`, on a
# Unix socket) compresses and the `static` backend caches what it returns. haproxy also hands a
# cached gzip variant to a client that asked for none: only gzip-accepting requests use it.
STATIC = dict(
    global_extra="    tune.comp.maxlevel 9  # the static files are compressed once, then served from memory\n",
    frontend_extra="    use_backend static if { path_beg /static/ } { req.hdr(accept-encoding) -m sub gzip }\n",
    compression=COMPRESSION,
    sections="""
backend static
    http-request cache-use static
    http-response cache-store static
    server gzip unix@{socket}

listen gzip
    bind unix@{socket}
    balance roundrobin
{compression}{plain_servers}

cache static
    total-max-size 64
    max-object-size 16777216
    max-age 86400
    process-vary on
""")
PLAIN = dict.fromkeys(STATIC, "")


class Proxy(NamedTuple):
    url: str          # http://127.0.0.1:<port>
    pid: int          # haproxy's process (its own process group)
    backends: tuple   # the servers' base URLs, in the order of their cookie values s0, s1...

    def server_of(self, cookie_value):
        """The backend URL a PEFT_SERVER cookie value names (None if unknown)."""
        if cookie_value and cookie_value.startswith("s") and cookie_value[1:].isdigit():
            i = int(cookie_value[1:])
            return self.backends[i] if i < len(self.backends) else None
        return None


def config_text(backends, bind, static=False, socket_path=None):
    """haproxy's configuration: listening on `bind` (host:port), in front of `backends` (URLs);
    with `static`, its compressing proxy on the Unix socket `socket_path`."""
    servers, plain = [], []
    for i, url in enumerate(backends):
        where = urlsplit(url)
        servers.append(f"    server s{i} {where.hostname}:{where.port} cookie s{i} check inter 2s")
        plain.append(f"    server s{i} {where.hostname}:{where.port} check inter 2s")
    parts = dict(STATIC if static else PLAIN)
    parts["sections"] = parts["sections"].format(socket=socket_path, compression=COMPRESSION,
                                                 plain_servers="\n".join(plain))
    return CONFIG.format(bind=bind, cookie=COOKIE, servers="\n".join(servers), **parts)


@contextlib.contextmanager
def haproxy(backends, port=None, timeout=20, static=False):
    """Yield a Proxy for a fresh haproxy in front of `backends` (base URLs), listening on
    127.0.0.1:`port` (a free one by default), with `static`: compressing, and caching the static
    files; stop it (it only) afterwards."""
    if not Path(HAPROXY).exists():
        raise RuntimeError(f"{HAPROXY} not found: apt-get install -y haproxy")
    port = port or free_port()
    folder = Path(tempfile.mkdtemp(prefix="peft-haproxy-"))
    cfg = folder / "haproxy.cfg"
    cfg.write_text(config_text(backends, f"127.0.0.1:{port}", static, folder / "gzip.sock"))
    check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy refused its configuration: {check.stderr or check.stdout}")
    log = open(folder / "haproxy.log", "wb")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for_port(proc, port, timeout, "haproxy",
                      lambda: (folder / "haproxy.log").read_text(errors="replace")[-2000:])
        yield Proxy(f"http://127.0.0.1:{port}", proc.pid, tuple(backends))
    finally:
        stop_group(proc)  # its own group: haproxy alone
        log.close()
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Run haproxy in front of the class's web servers "
                                 "(sticky, X-Forwarded-For set, static files compressed and cached).")
    ap.add_argument("ports", nargs="+", type=int, help="the web servers' ports on 127.0.0.1")
    ap.add_argument("--listen", default="127.0.0.1:8080",
                    help="address:port the students open (default 127.0.0.1:8080; 0.0.0.0:8080 for the room)")
    ap.add_argument("--print", action="store_true", help="print the configuration and exit")
    args = ap.parse_args(argv)
    backends = [f"http://127.0.0.1:{port}" for port in args.ports]
    if args.print:  # for a system haproxy: Debian's package makes /run/haproxy
        print(config_text(backends, args.listen, True, "/run/haproxy/peft-gzip.sock"))
        return
    folder = Path(tempfile.mkdtemp(prefix="peft-haproxy-"))
    text = config_text(backends, args.listen, True, folder / "gzip.sock")
    cfg = folder / "haproxy.cfg"
    cfg.write_text(text)
    print(f"haproxy on {args.listen} in front of 127.0.0.1:{', '.join(map(str, args.ports))} (Ctrl-C stops it)")
    os.execv(HAPROXY, [HAPROXY, "-db", "-f", str(cfg)])


if __name__ == "__main__":
    main()
