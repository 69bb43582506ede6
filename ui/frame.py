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


def low_rank_view():
    """The method that bets on a low-rank update (its view has a rank): the spectrum checks
    its bet, and the storage page prices its preset."""
    return next(v for v in method_views() if v.rank)


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


# What every page shares in the browser, sent once per run by app.py (the same element each run,
# so the browser keeps it and its script runs once per tab):
# - less of Streamlit's empty band above the title (6rem): on a 720-pixel screen or a projector,
#   a page's controls and live curve start that much higher;
# - captions at 7:1 on white (Streamlit draws them 0.6 opaque: 2.8:1 to 3.9:1, under WCAG's 4.5:1);
# - a page's sections are h2 under its h1 title (a screen reader's outline skips no level), drawn
#   at the size of a subheader;
# - Streamlit's own markup made whole for a keyboard and a screen reader, as it appears: a table
#   that scrolls sideways (a phone) takes the focus, so arrows scroll it, and says what it is;
#   the file uploader's drop zone is a labelled group, not a "presentation" that has a label;
# - one polite live region for the whole tab, which says the text of the page's hidden
#   data-announce elements whenever it changes (a run's progress, ui.runs.announce): a region
#   drawn by the page itself would be replaced on every refresh, and a new region is not read.
PAGE_FRAME = """<style>
:root {--peft-frame: 1}
[data-testid=stMainBlockContainer] {padding-top: 2.5rem}
[data-testid=stCaptionContainer] {color: #55585f; opacity: 1}
[data-testid=stMain] h2 {font-size: 1.5rem}
@media (max-width: 640px) {.st-key-train_layout > div > [data-testid=stHorizontalBlock] {flex-direction: column-reverse}}
#peft-announcer {position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); white-space: nowrap}
</style>
<script>
if (!window.peftFrame) {
  window.peftFrame = true;
  let tables = 0;
  const announcer = document.createElement('div');
  announcer.id = 'peft-announcer';
  announcer.setAttribute('role', 'status');
  announcer.setAttribute('aria-live', 'polite');
  document.body.appendChild(announcer);
  const mend = () => {
    const news = Array.from(document.querySelectorAll('[data-announce]'), e => e.textContent).join(' ');
    if (news && news !== announcer.textContent) announcer.textContent = news;
    for (const box of document.querySelectorAll('[data-testid=stTable] > div')) {
      if (box.scrollWidth > box.clientWidth + 1 && box.tabIndex < 0) {
        box.tabIndex = 0;
        box.setAttribute('role', 'region');
        const head = box.querySelector('th');
        box.setAttribute('aria-label', 'Table ' + (++tables) + (head ? ' (' + head.textContent.trim() + '...)' : '') + ', scrolls sideways');
      }
    }
    for (const zone of document.querySelectorAll('[data-testid=stFileUploaderDropzone][role=presentation]')) {
      zone.setAttribute('role', 'group');
    }
  };
  let queued = false;
  new MutationObserver(() => {
    if (!queued) { queued = true; requestAnimationFrame(() => { queued = false; mend(); }); }
  }).observe(document.body, {childList: true, subtree: true});
  window.addEventListener('resize', mend);
  mend();
}
</script>"""


def page_frame():
    st.html(PAGE_FRAME, unsafe_allow_javascript=True)
