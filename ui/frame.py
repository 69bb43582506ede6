"""The page frame: a section of a page that fails alone (panel), the session's state, and how each
method looks (views/)."""
import contextlib
import logging

import streamlit as st

import views
from peftcore.service.store import StoreError


log = logging.getLogger("peft_playground")


view_of = views.view_of  # how a method looks, by peft_type (views/: one file per method)


def method_views(shares_base=None):
    """The views of every registered method (or of those that do / do not share the base)."""
    return [v for v in views.all_views() if shares_base is None or v.method.shares_base == shares_base]


def view_named(name):
    return next(v for v in views.all_views() if v.name == name)


def run_view(run):
    """The view of the method a run trains (its model's active config)."""
    model = run.model
    return view_of(model.peft_config[model.active_adapter].peft_type)


ss = st.session_state


PANEL_FAILED = "could not be shown"  # what a visitor reads when a section of a page fails


@contextlib.contextmanager
def panel(what):
    """One section of a page (`what` names it for the visitor). If it fails, the visitor reads
    a short message, the details go to the server's log, and the rest of the page still draws.
    Streamlit's rerun and stop are BaseExceptions: they pass through."""
    try:
        yield
    except StoreError as e:  # the store's own messages are written for visitors
        st.error(f"{what}: {e}")
    except Exception:  # noqa: BLE001 - a visitor sees no traceback; the log has it
        log.exception("a page section failed: %s", what)
        st.error(f"{what} {PANEL_FAILED}: something went wrong on the server (its log has the "
                 "details). The rest of the page works; try again, or reset your session in the sidebar.")
