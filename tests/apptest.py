"""Opening the app under AppTest the way a visitor does: app.py with a link's query, then a page."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent


def open_page(page, query=None):
    """AppTest of app.py (sidebar, navigation) with `query` in the URL, switched to `page`."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.query_params.update(query or {})
    at.run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at
