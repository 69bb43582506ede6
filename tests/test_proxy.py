"""The lecture-hall proxy (harness.proxy, static=True; README: Run a lecture hall): the app's
static files reach a browser compressed and, from the second visit on, from the proxy's memory;
a client that accepts no gzip gets the file as the server sends it; the page still works
through it (tests/test_simulated_class.py seats a class through the same proxy)."""
import gzip
import re
import urllib.request
from pathlib import Path

import pytest

from harness.proxy import HAPROXY, haproxy


def get(url, accept_encoding=None):
    request = urllib.request.Request(url, headers={"Accept-Encoding": accept_encoding} if accept_encoding else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return {k.lower(): v for k, v in response.headers.items()}, response.read()


@pytest.fixture(scope="module")
def proxied(url):
    if not Path(HAPROXY).exists():
        pytest.fail(f"{HAPROXY} is missing: tests/setup.sh installs it")
    with haproxy([url], static=True) as proxy:
        yield url, proxy.url


def test_static_files_are_compressed_once_and_then_served_from_the_proxy(proxied):
    server, proxy = proxied
    _, page = get(server + "/")
    script = re.search(rb'src="\./(static/js/index\.[^"]+\.js)"', page).group(1).decode()
    _, original = get(f"{server}/{script}")

    first_headers, first = get(f"{proxy}/{script}", "gzip, deflate, br, zstd")
    again_headers, again = get(f"{proxy}/{script}", "gzip, deflate, br, zstd")
    assert first_headers.get("content-encoding") == "gzip"
    assert gzip.decompress(first) == original
    assert len(first) < len(original) / 2
    assert "age" not in first_headers       # from the web server...
    assert "age" in again_headers           # ...then from haproxy's cache
    assert again_headers.get("content-encoding") == "gzip" and gzip.decompress(again) == original


def test_a_client_without_gzip_gets_the_file_as_it_is(proxied):
    server, proxy = proxied
    _, page = get(server + "/")
    script = re.search(rb'src="\./(static/js/index\.[^"]+\.js)"', page).group(1).decode()
    get(f"{proxy}/{script}", "gzip")  # a gzip variant is in the cache now
    headers, body = get(f"{proxy}/{script}")
    assert "content-encoding" not in headers
    assert body == get(f"{server}/{script}")[1]


def test_the_page_itself_comes_compressed_and_sticky(proxied):
    _, proxy = proxied
    headers, body = get(proxy + "/", "gzip")
    assert headers.get("content-encoding") == "gzip"
    assert b"<html" in gzip.decompress(body).lower()
    assert "PEFT_SERVER=s0" in headers.get("set-cookie", "")
