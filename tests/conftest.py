import ast
import functools
import logging
import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

import peftcore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the app's own modules (ui, bench) as `streamlit run` sees them

# Saved phi and classes go to a store of this test session, never the user's own (the
# app servers the browser tests start inherit it).
os.environ["PEFT_STORE"] = os.path.join(tempfile.mkdtemp(prefix="peft-store-"), "store.sqlite3")

# One intra-op thread: this model's matmuls are tiny, and on a shared 2-core machine two
# OpenMP threads per op run several times slower than one (see BENCHMARKS.md).
torch.set_num_threads(1)


# ------------------------------------------------------------------ two lanes
# tests/run runs the suite in two lanes at once: `-m realtime` in one process at normal
# priority (every test that starts a server, a browser or a Ray head, or holds a wall-clock
# bound: one server and one Ray serve them all), and the rest in two workers at the lowest CPU
# priority (SCHED_IDLE), which use what the realtime lane leaves idle and never slow it down.
REALTIME_FIXTURES = {"url", "browser", "sync_api", "ray_head", "ray_address"}
HARNESS_MODULES = {"harness.servers", "harness.proxy", "harness.browser"}


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path):
    """Every module `path` imports, anywhere in it (functions too), relative imports resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from peftcore import service`
    return found


@functools.cache
def _imports_harness(module_path):
    return bool(HARNESS_MODULES & imports(Path(module_path)))


def is_realtime(item):
    """Whether the test's outcome can depend on the wall clock: marked so, or it uses the
    shared server, browser or Ray head, or its module starts servers of its own."""
    return bool(item.get_closest_marker("realtime") or REALTIME_FIXTURES & set(item.fixturenames)
                or _imports_harness(item.module.__file__))


# The other lane hands out a module at a time in collection order (tests/run turns off xdist's
# own order, most tests first, which left test_visitor's few long tests running alone at the
# end): its longest modules go first, so that neither worker is left running one alone at the
# end. Longest as measured in that lane, alone: 150, 110, 70, then 20-30 s each.
LONGEST_FIRST = ("test_learning", "test_visitor", "test_app", "test_runs", "test_hostile_room", "test_room_class",
                 "test_merging_pages", "test_core", "test_bank", "test_prefix")


def pytest_itemcollected(item):
    if is_realtime(item) and not item.get_closest_marker("realtime"):
        item.add_marker(pytest.mark.realtime)


def pytest_collection_modifyitems(items):
    def order(item):
        module = item.module.__name__.rpartition(".")[2]
        return (not is_realtime(item), LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST))
    items.sort(key=order)  # stable: a module's own order is kept


class _PanelFailures(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.failed = []

    def emit(self, record):
        if record.getMessage().startswith("a page section failed"):
            self.failed.append(self.format(record))


@pytest.fixture(autouse=True)
def no_failed_panel(request):
    """A page section that fails shows its visitor one line and logs the traceback
    (ui.panel): the page still draws, so no AppTest exception and no crawler would see it. Any
    test whose page had one fails here, unless it is marked panel_fails."""
    handler = _PanelFailures()
    logger = logging.getLogger("peft_playground")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    if handler.failed and not request.node.get_closest_marker("panel_fails"):
        pytest.fail(f"{len(handler.failed)} page section(s) failed; the first:\n{handler.failed[0][-3000:]}")


@pytest.fixture(scope="session")
def base():
    return peftcore.load_base()


@pytest.fixture(scope="session")
def base_fp(base):
    return peftcore.fingerprint(base)


@pytest.fixture
def store_path(tmp_path, monkeypatch):
    """A class store of the test's own, where the pages it opens look for it ($PEFT_STORE)."""
    from peftcore.service.store import ENV_VAR
    path = tmp_path / "class.sqlite3"
    monkeypatch.setenv(ENV_VAR, str(path))
    return path


@pytest.fixture
def batch():
    return peftcore.TASKS["times_3"].batch(16, torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ browser tests
# One `streamlit run` and one chromium for every browser test file (the server starts on
# first use only). Tests that need a server nobody has visited yet start their own.
def _require_browser():
    from harness.browser import CHROMIUM
    if not Path(CHROMIUM).exists():
        if os.environ.get("PEFT_REQUIRE_BROWSER"):  # CI: a missing browser fails, not skips
            raise RuntimeError(f"{CHROMIUM} is missing and PEFT_REQUIRE_BROWSER is set; run tests/setup.sh")
        pytest.skip(f"{CHROMIUM} is not installed")
    return pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="session")
def sync_api():
    return _require_browser()


@pytest.fixture(scope="session")
def url(sync_api):
    from harness.servers import app_server
    # the browser tests are many visitors on one loopback address, one after another: no
    # per-address cap between them (tests/test_room_identity.py tests the cap)
    with app_server(env={"PEFT_MAX_PER_ADDRESS": "0"}) as base_url:
        yield base_url


@pytest.fixture(scope="session")
def browser(sync_api):
    from harness.browser import launch_chromium
    with sync_api.sync_playwright() as pw:
        b = launch_chromium(pw)
        yield b
        b.close()


@pytest.fixture
def new_page(browser):
    """Pages in fresh browser contexts (a fresh Streamlit session each). Every request the
    pages make must go to the app's own server: the app works offline and leaks no visit."""
    contexts, foreign = [], []

    def make(width=1400, height=1000):
        context = browser.new_context(viewport={"width": width, "height": height})
        context.on("request", lambda r: foreign.append(r.url)
                   if urlparse(r.url).hostname not in ("127.0.0.1", "localhost") and
                   urlparse(r.url).scheme in ("http", "https", "ws", "wss") else None)
        contexts.append(context)
        return context.new_page()

    yield make
    for c in contexts:
        c.close()
    assert not foreign, f"the app asked other hosts: {sorted(set(foreign))[:5]}"


@pytest.fixture
def page(new_page):
    return new_page()
