"""Every student (issue 32), in a real browser: no axe-core violation of WCAG 2.2 AA on any
page at a phone's, a laptop's and a projector's size, nor on a training result; the lesson
works from the keyboard alone; a screen reader hears a run's progress and result."""
import pytest

from harness.browser import axe_violations, wait_ready
from test_browser import see, visit

SIZES = [(390, 844), (1280, 720), (1920, 1080)]
PAGES = ["", "train", "serve", "inside", "classroom"]
FOCUSED = """() => { const e = document.activeElement;
    return [e.tagName, e.getAttribute('aria-label') || e.textContent.trim().slice(0, 40), e.getAttribute('aria-valuetext')]; }"""


@pytest.mark.parametrize("width, height", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_no_axe_violation_on_any_page(new_page, url, width, height):
    page = new_page(width, height)
    found = {}
    for path in PAGES:
        visit(page, f"{url}/{path}")
        page.wait_for_timeout(500)  # lazily loaded widgets (charts, the uploader) drawn
        found[path or "storage"] = axe_violations(page)
    assert not any(found.values()), found


def test_no_axe_violation_on_a_result_and_a_screen_reader_hears_the_run(page, url):
    visit(page, f"{url}/train")
    page.get_by_role("button", name="Train", exact=True).click()
    heard = set()
    for _ in range(240):  # what the one polite live region says, sampled while the run trains
        heard.add(page.evaluate("() => document.getElementById('peft-announcer').textContent"))
        if page.get_by_text("Results on times_3").count():
            break
        page.wait_for_timeout(250)
    see(page, "Results on times_3", timeout=120_000)
    wait_ready(page)
    page.wait_for_function("document.getElementById('peft-announcer').textContent.includes('held-out exact match')")
    heard.add(page.evaluate("() => document.getElementById('peft-announcer').textContent"))
    assert page.locator("#peft-announcer[role=status][aria-live=polite]").count() == 1
    assert any("LoRA: training" in h for h in heard), heard
    assert any(h.startswith("LoRA: done at step") and "held-out exact match" in h for h in heard), heard
    assert axe_violations(page) == []


def tab_to(page, want, key="Tab", limit=80):
    """Press `key` until the focused element satisfies `want` (given FOCUSED's triple)."""
    for _ in range(limit):
        page.keyboard.press(key)
        if want(page.evaluate(FOCUSED)):
            return page.evaluate(FOCUSED)
    raise AssertionError(f"not reached by {key} in {limit} presses; focus on {page.evaluate(FOCUSED)}")


def test_the_lesson_by_keyboard_alone(page, url):
    """No mouse: move the phi slider five steps (focus stays on it through every rerun), go to
    Train by the sidebar's link, start a run, and read its result."""
    visit(page, url)
    tab_to(page, lambda f: f[1] == "phi size p (% of the base)")
    values = []
    for _ in range(5):
        page.keyboard.press("ArrowRight")
        page.wait_for_timeout(300)
        wait_ready(page)
        tag, label, value = page.evaluate(FOCUSED)
        assert (tag, label) == ("INPUT", "phi size p (% of the base)"), "the slider lost the focus"
        values.append(value)
    assert values == ["1.5%", "2%", "3%", "5%", "7%"], values
    assert "p=7%25" in page.url
    see(page, "With 100 tasks at 7%")
    tab_to(page, lambda f: f[0] == "A" and f[1].endswith("Train a sliver"), key="Shift+Tab")  # after its icon's name
    page.keyboard.press("Enter")
    wait_ready(page)
    page.get_by_role("heading", name="Train a sliver").wait_for()
    tab_to(page, lambda f: f[0] == "BUTTON" and f[1] == "Train")
    page.keyboard.press("Enter")
    see(page, "Results on times_3", timeout=120_000)
    see(page, "held-out exact match")


def test_on_a_phone_train_is_on_the_first_screen(new_page, url):
    """At 390x844 the columns stack; Train and the live curve come before the set-up."""
    page = new_page(390, 844)
    visit(page, f"{url}/train")
    box = page.get_by_role("button", name="Train", exact=True).bounding_box()
    assert box["y"] + box["height"] <= 844, box
    see(page, "No run yet: choose a task and a method in the set-up")


def test_the_mixed_batch_starts_on_the_serve_pages_first_screen(page, url):
    """The bank's table of every phi is folded: the mixed batch is no longer 1,700 px down."""
    visit(page, f"{url}/serve")  # the default page size, 1400x1000
    assert page.get_by_role("heading", name="Serve a mixed batch").bounding_box()["y"] < 1000


def test_a_race_keeps_its_curves_in_view_and_its_titles_apart(page, url):
    """At 1280x720 a race's curves come right under Train, and the two panels' rotated y-titles
    ("training loss", "exact match (%)") never run into each other, however long the legend."""
    page.set_viewport_size({"width": 1280, "height": 720})
    visit(page, f"{url}/train")
    page.get_by_text("Race", exact=True).click()
    wait_ready(page)
    page.get_by_role("button", name="Train", exact=True).click()
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .legendtext').length >= 3", timeout=60_000)
    top, bottom = page.evaluate("""() => ['.g-ytitle', '.g-y2title'].map(s =>
        document.querySelector('.js-plotly-plot ' + s).getBoundingClientRect())
        .map(r => ({top: r.top, bottom: r.bottom}))""")
    assert top["bottom"] < bottom["top"], (top, bottom)
    assert page.locator(".js-plotly-plot").first.bounding_box()["y"] < 720 - 300  # 300 px of curves in view
    # what was asked is seen: Stop ends the race here and its results follow (a race that runs
    # to its own end: tests/test_app.py)
    page.get_by_role("button", name="Stop", exact=True).click()
    see(page, "Results on times_3", timeout=180_000)


def test_no_axe_violation_on_a_merged_phi_on_a_phone(new_page, url):
    """Many phi become one (issue 34): the controls, the table, the svd chart and the buttons
    that follow a merge, at a phone's width."""
    page = new_page(390, 844)
    visit(page, f"{url}/serve")
    page.get_by_role("button", name="Combine into one phi").click()
    see(page, "svd of 2 phi", timeout=60_000)
    wait_ready(page)
    page.wait_for_timeout(500)  # the chart drawn
    assert page.get_by_role("button", name="Save it to my bank").count() == 1
    assert axe_violations(page) == []
