"""A student's first visit, weighed: what a browser downloads to open the app, straight from a
web server, through the plain proxy and through the lecture-hall proxy (harness.proxy's
`static=True`: compressed, the static files cached), and what a whole class opening it at
once costs the web server, the proxy and the network.

    python -m bench.firstload [--students N] [--repeat R]

1. One headless Chromium (a fresh profile: nothing cached) per route opens the app's first
   page and waits for its script run and its chart; every request it made is listed with
   the bytes that crossed the wire (Playwright's request sizes: headers and body as sent,
   compressed where the response was).
2. N students at once fetch that same list (every GET of the app's own origin but the
   websocket, up to six connections each, as Chromium opens per host), asking for gzip, deflate
   and br as Chromium does; per route: seconds to the last byte, bytes received, the web
   server's and haproxy's CPU seconds. This process runs at nice 19 (the students' own
   machines in a room).
"""
import argparse
import asyncio
import contextlib
import os
import statistics
import time
from urllib.parse import urlsplit

from harness.browser import launch_chromium, wait_ready
from harness.proxy import haproxy
from harness.servers import proc_cpu_seconds, streamlit_server

ACCEPT_ENCODING = "gzip, deflate, br, zstd"  # what Chromium sends
PER_HOST = 6                                # Chromium's connections per host
CHART = ".js-plotly-plot .main-svg"


def proc_cpu(pid):
    return proc_cpu_seconds(f"/proc/{pid}/stat")


def record(url):
    """The requests of one first visit to `url` in a fresh Chromium: [(path, bytes on the wire,
    content-encoding)], and the seconds to a drawn chart."""
    from playwright.sync_api import sync_playwright
    seen = []
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()

            def finished(request):
                response = request.response()
                sizes = request.sizes()
                seen.append((request.url, sizes["responseHeadersSize"] + sizes["responseBodySize"],
                             response.header_value("content-encoding") if response else None))
            page.on("requestfinished", finished)
            start = time.perf_counter()
            page.goto(url + "/")
            wait_ready(page)
            page.wait_for_selector(CHART, timeout=60_000)
            seconds = time.perf_counter() - start
            page.wait_for_load_state("networkidle")
        finally:
            browser.close()
    origin = urlsplit(url).netloc
    own = [(urlsplit(u).path + (f"?{urlsplit(u).query}" if urlsplit(u).query else ""), n, enc)
           for u, n, enc in seen if urlsplit(u).netloc == origin]
    return own, seconds


async def fetch(host, port, path):
    """GET `path` as Chromium would (one connection, closed after): bytes received."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\n"
                      f"Accept-Encoding: {ACCEPT_ENCODING}\r\nConnection: close\r\n\r\n").encode())
        await writer.drain()
        total = 0
        while chunk := await reader.read(1 << 16):
            total += len(chunk)
        return total
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def student(host, port, paths):
    lanes = asyncio.Semaphore(PER_HOST)

    async def one(path):
        async with lanes:
            return await fetch(host, port, path)
    return sum(await asyncio.gather(*(one(p) for p in paths)))


async def class_load(url, paths, n):
    where = urlsplit(url)
    start = time.perf_counter()
    got = await asyncio.gather(*(student(where.hostname, where.port, paths) for _ in range(n)))
    return time.perf_counter() - start, sum(got)


def measure(route, url, pids, n):
    paths, seconds = record(url)
    paths_only = [p for p, _, _ in paths if not p.startswith("/_stcore/stream")]
    before = {name: proc_cpu(pid) for name, pid in pids.items()}
    wall, received = asyncio.run(class_load(url, paths_only, n))
    cpu = {name: proc_cpu(pid) - before[name] for name, pid in pids.items()}
    return dict(route=route, requests=len(paths), wire=sum(b for _, b, _ in paths),
                compressed=sum(1 for _, _, enc in paths if enc), seconds=seconds, n=n, wall=wall,
                received=received, server_cpu=cpu["server"], proxy_cpu=cpu.get("proxy"))


def table(rows):
    out = ["| route | requests (compressed) | first visit MB | to the chart s | students | all loaded s "
           "| MB received | web server CPU s | haproxy CPU s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        proxy = "-" if r["proxy_cpu"] is None else f"{r['proxy_cpu']:.2f}"
        out.append(f"| {r['route']} | {r['requests']:.0f} ({r['compressed']:.0f}) | {r['wire'] / 1e6:.2f} "
                   f"| {r['seconds']:.1f} | {r['n']} | {r['wall']:.1f} | {r['received'] / 1e6:.0f} "
                   f"| {r['server_cpu']:.2f} | {proxy} |")
    return "\n".join(out)


def median_rows(rows):
    keys = ("requests", "wire", "compressed", "seconds", "wall", "received", "server_cpu", "proxy_cpu")
    return {**rows[0], **{k: None if rows[0][k] is None else statistics.median(r[k] for r in rows)
                         for k in keys}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", type=int, default=100, help="first visits at once (default 100)")
    ap.add_argument("--repeat", type=int, default=1, help="classes per route, alternating; the median")
    args = ap.parse_args(argv)
    results = {}
    # in-process runs: a first visit trains nothing; fresh proxies per class, so each cache starts empty
    with streamlit_server(executor="inprocess") as server:
        os.nice(19)  # the students' browsers and fetches; the server and the proxies stay at 0
        for _ in range(args.repeat):
            results.setdefault("straight to the web server", []).append(
                measure("straight to the web server", server.url, {"server": server.pid}, args.students))
            for route, static in (("plain proxy (haproxy)", False), ("lecture-hall proxy: gzip, cache", True)):
                with haproxy([server.url], static=static) as proxy:
                    results.setdefault(route, []).append(
                        measure(route, proxy.url, {"server": server.pid, "proxy": proxy.pid}, args.students))
    print(f"`python -m bench.firstload --students {args.students} --repeat {args.repeat}`\n")
    print(table([median_rows(rows) for rows in results.values()]))


if __name__ == "__main__":
    main()
