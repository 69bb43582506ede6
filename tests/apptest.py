"""Opening the app under AppTest the way a visitor does: app.py with a link's query, then a page."""
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent


def app(script="app.py"):
    """The one way the tests open the app under AppTest: app.py (or one page's file alone),
    not yet run, with a timeout a loaded 2-core machine needs."""
    return AppTest.from_file(str(ROOT / script), default_timeout=120)


def open_page(page=None, query=None):
    """AppTest of app.py (sidebar, navigation) opened at `page` (None: the first page) with
    `query` in the URL, as a visitor's link opens it: one run, that page's."""
    at = app()
    at.query_params.update(query or {})
    if page:
        at.switch_page(page)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# a rerun every 2 s while a run trains: each reruns the whole page, and the tests that wait
# share the cores with the runs they wait for
POLL_S = 2.0


def wait_for(at, done, timeout=150):
    """Rerun until `done(at)`: AppTest does not fire run_every, so poll as the browser does."""
    deadline = time.time() + timeout
    while not done(at):
        assert time.time() < deadline, "timed out waiting for the app"
        time.sleep(POLL_S)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
    return at
