"""A real sticky reverse proxy in front of several `streamlit run` servers: Debian's haproxy
(`apt-get install -y haproxy`), started on a free port of 127.0.0.1 and stopped afterwards.

    with haproxy([server.url for server in servers]) as proxy:
        ...  # a browser (or bench.simulate's student) opens proxy.url

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
- No compression and no cache here (issue 35 item 3 measures those).
"""
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from bench.appserver import free_port

HAPROXY = "/usr/sbin/haproxy"
COOKIE = "PEFT_SERVER"

CONFIG = """\
global
    maxconn 4000
    # no `daemon`: haproxy stays this process's child, in the foreground (-db)

defaults
    mode http
    option http-server-close
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout tunnel 2h
    timeout http-request 30s

frontend class
    bind 127.0.0.1:{port}
    http-request set-header X-Forwarded-For %[src]
    default_backend streamlit

backend streamlit
    balance leastconn
    cookie {cookie} insert indirect nocache httponly
{servers}
"""


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


def config_text(backends, port):
    servers = []
    for i, url in enumerate(backends):
        where = urlsplit(url)
        servers.append(f"    server s{i} {where.hostname}:{where.port} cookie s{i} check inter 2s")
    return CONFIG.format(port=port, cookie=COOKIE, servers="\n".join(servers))


@contextlib.contextmanager
def haproxy(backends, port=None, timeout=20):
    """Yield a Proxy for a fresh haproxy in front of `backends` (base URLs), listening on
    127.0.0.1:`port` (a free one by default); stop it (it only) afterwards."""
    if not Path(HAPROXY).exists():
        raise RuntimeError(f"{HAPROXY} not found: apt-get install -y haproxy")
    port = port or free_port()
    folder = Path(tempfile.mkdtemp(prefix="peft-haproxy-"))
    cfg = folder / "haproxy.cfg"
    cfg.write_text(config_text(backends, port))
    check = subprocess.run([HAPROXY, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy refused its configuration: {check.stderr or check.stdout}")
    log = open(folder / "haproxy.log", "wb")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"haproxy exited: {(folder / 'haproxy.log').read_text(errors='replace')[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError(f"haproxy did not listen on 127.0.0.1:{port} within {timeout} s") from None
                time.sleep(0.1)
        yield Proxy(f"http://127.0.0.1:{port}", proc.pid, tuple(backends))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own group: haproxy alone
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
