"""The app in a real browser: one `streamlit run` for the module, headless Debian chromium.

Each page renders without an exception and shows its key content; the storage sliders
live in the URL; a short training run polls live and ends with its results."""
import re

import pytest

from harness.browser import wait_ready
from harness.servers import app_server

EXCEPTION = "[data-testid=stException]"


def visit(page, url):
    page.goto(url)
    wait_ready(page)
    assert page.locator(EXCEPTION).count() == 0


def playwright():
    """Playwright's sync API (the browser tests skip where it is missing)."""
    return pytest.importorskip("playwright.sync_api")


def see(page, text, timeout=30_000, exact=False):
    """Wait until `text` is on the page. When it never comes, say what the page showed instead:
    a browser test that fails in CI must explain itself from the log alone."""
    try:
        page.get_by_text(text, exact=exact).first.wait_for(state="attached", timeout=timeout)
    except playwright().TimeoutError:
        errors = page.locator(EXCEPTION).all_inner_texts()
        raise AssertionError(f"{text!r} never showed at {page.url}; exceptions: {errors}; "
                             f"the page said:\n{page.inner_text('body')[:3000]}") from None


def press(page, slider, key):
    """Press `key` on a slider until its value moves: a key pressed while the widget is still
    mounting is lost."""
    before = slider.get_attribute("aria-valuenow")
    for attempt in range(3):
        slider.press(key)  # focus and key on this slider: a rerun that lands between the two moves focus
        try:
            playwright().expect(slider).not_to_have_attribute("aria-valuenow", before, timeout=5_000)
            return
        except AssertionError:
            pass
    raise AssertionError(f"the slider stayed at {before} through three presses of {key}")


def short_run(page):
    """Press Train on the fewest steps (10) and wait for the result card."""
    press(page, page.get_by_test_id("stSlider").filter(has_text="Steps").get_by_role("slider"), "Home")
    wait_ready(page)
    page.get_by_role("button", name="Train", exact=True).click()
    see(page, "Results on times_3", timeout=120_000)  # the fragment's polling ended the run
    wait_ready(page)


def test_every_page_works_as_the_first_page_a_fresh_server_serves(new_page, sync_api):
    # Each page is the first a server ever runs (a page must import what it uses itself), and
    # the app is whole there (a pages/ folder would serve the bare page script, no sidebar).
    for path, title in [("train", "Train a sliver"), ("serve", "Many tasks at once"), ("inside", "Inside: why it works")]:
        with app_server() as fresh:
            page = new_page()
            visit(page, f"{fresh}/{path}")
            assert page.get_by_role("heading", name=title).count() == 1
            sync_api.expect(page.get_by_test_id("stSidebarNav").get_by_text("One base, many tasks")).to_be_visible()
            sync_api.expect(page.get_by_test_id("stSidebar").get_by_role("button", name="Reset my session")).to_be_visible()
            if path == "train":
                short_run(page)  # the result card used a module no page had imported yet
                assert page.get_by_test_id("stMetricLabel").filter(has_text="phi file").is_visible()
                assert page.locator(EXCEPTION).count() == 0


@pytest.mark.parametrize("path, title, content", [
    ("", "One base, many tasks", ".js-plotly-plot"),
    ("train", "Train a sliver", "role=button[name=/^Train$/]"),
    ("serve", "Many tasks at once", "text=Upload a phi file"),
    ("inside", "Inside: why it works", "svg"),
])
def test_page_renders(page, url, path, title, content, sync_api):
    visit(page, f"{url}/{path}")
    assert page.get_by_role("heading", name=title).count() == 1
    # widgets' code loads lazily in a new browser context: wait for them, not just the script
    sync_api.expect(page.locator(content).first).to_be_visible(timeout=30_000)
    sync_api.expect(page.get_by_test_id("stSidebar").get_by_role("button", name="Reset my session")).to_be_visible()


def test_navigation_keeps_the_sidebar(page, url):
    visit(page, url)
    page.get_by_test_id("stSidebarNav").get_by_text("Inside: why it works").click()
    wait_ready(page)
    assert page.get_by_role("heading", name="Inside: why it works").count() == 1
    assert page.get_by_test_id("stSidebar").get_by_text("Seed", exact=True).first.is_visible()
    assert page.locator(EXCEPTION).count() == 0


def test_storage_sliders_live_in_the_url(page, url, sync_api):
    expect = sync_api.expect
    visit(page, f"{url}/?p=0.5%25&T=1000")
    headline = page.locator("h2").first
    assert headline.inner_text() == "With 1,000 tasks at 0.5%, PEFT stores 6 base models; full fine-tuning stores 1,000."
    phi = page.get_by_test_id("stSlider").filter(has_text="phi size p").get_by_role("slider")
    press(page, phi, "ArrowRight")  # 0.5% -> 0.7%
    expect(headline).to_contain_text("With 1,000 tasks at 0.7%", timeout=30_000)
    expect(page).to_have_url(re.compile(r"p=0\.7%25"), timeout=10_000)


def test_a_short_training_run_goes_live_and_finishes(page, url):
    visit(page, f"{url}/train")
    short_run(page)
    assert "train=" in page.url  # a refresh finds the run again
    assert page.get_by_test_id("stMetricLabel").filter(has_text="trainable parameters").is_visible()
    assert page.get_by_text("unchanged").first.is_visible()
    assert page.locator(EXCEPTION).count() == 0
    page.reload()
    wait_ready(page)
    see(page, "Results on times_3")


def test_a_shared_link_shows_the_run_read_only(new_page, url):
    owner, visitor = new_page(), new_page()  # two browsers: two visitors
    visit(owner, f"{url}/train")
    steps = owner.get_by_test_id("stSlider").filter(has_text="Steps").get_by_role("slider")
    press(owner, steps, "End")  # a long run: 1000 steps...
    wait_ready(owner)
    owner.get_by_text("Stop when solved").click()  # ...that does not end early when solved
    wait_ready(owner)
    owner.get_by_role("button", name="Train", exact=True).click()
    stop = stop_button(owner)
    stop.wait_for(timeout=60_000)
    visitor.goto(owner.url)  # the link the owner would share
    see(visitor, "read-only", timeout=60_000)
    assert stop_button(visitor).count() == 0
    visitor.get_by_test_id("stSidebar").get_by_role("button", name="Reset my session").click()
    wait_ready(visitor)
    owner.reload()  # the owner's refresh keeps the run, and it still trains: the visitor stopped nothing
    wait_ready(owner)
    assert "running" in owner.get_by_test_id("stProgress").first.inner_text()
    stop_button(owner).click()
    see(owner, "Results on times_3", timeout=60_000)
    assert "stopped" in owner.get_by_test_id("stProgress").first.inner_text()


def stop_button(page):
    """The panel's Stop button. Page-wide, "Stop" also names the button of Streamlit's own
    running indicator in the header, shown while any script run of the page is slow: CI
    once saw it on the read-only visitor's page."""
    return page.get_by_test_id("stMain").get_by_role("button", name="Stop", exact=True)


def choose(page, label, option):
    """Pick `option` in the selectbox labelled `label` (type to filter, then Enter)."""
    box = page.get_by_test_id("stSelectbox").filter(has_text=label)
    for attempt in range(3):  # a rerun that lands while the list is open closes it: open it again
        box.click()
        page.keyboard.type(option)
        try:
            page.get_by_role("option", name=option).first.click(timeout=10_000)
            break
        except playwright().TimeoutError:
            page.keyboard.press("Escape")
            wait_ready(page)
    else:
        raise AssertionError(f"{option!r} never showed in the list {label!r}")
    wait_ready(page)


def start_class(page, url, name):
    """Start a class as a teacher does on the Class page; its join code (from the link)."""
    visit(page, f"{url}/classroom")
    page.get_by_role("textbox", name="Class name").fill(name)
    page.get_by_role("button", name="Start a class").click()
    see(page, "teacher key", timeout=60_000)
    return re.search(r"class=([A-Z0-9]+)", page.url).group(1)


def test_a_class_end_to_end_and_a_saved_phi_outlives_the_tab(new_page, url):
    teacher = new_page()
    code = start_class(teacher, url, "Period 3")
    for student, phi in [("Ada", "lora-times_3"), ("Grace", "adapter-complement")]:
        page = new_page()
        visit(page, f"{url}/classroom?class={code}")
        page.get_by_role("textbox", name="Your name on the board").fill(student)
        page.keyboard.press("Enter")  # commit the name now: its rerun must not close the list below
        wait_ready(page)
        choose(page, "phi from your bank", phi)
        page.get_by_role("button", name="Save into the class").click()
        see(page, f"Saved {phi}", timeout=60_000)
        assert page.locator(EXCEPTION).count() == 0
    teacher.reload()
    wait_ready(teacher)
    see(teacher, "2 phi in the class")  # the board (a canvas grid) has both
    teacher.get_by_role("button", name=re.compile(r"Serve all 2 phi")).click()
    wait_ready(teacher)
    for task in ("times_3", "complement"):
        see(teacher, task)
    assert teacher.locator(EXCEPTION).count() == 0


def test_a_saved_phi_survives_a_refresh(page, url):
    visit(page, f"{url}/train")
    short_run(page)
    page.get_by_role("button", name="Save to my bank").click()
    see(page, "Saved lora-times_3-2")  # the library holds lora-times_3
    assert "bank=" not in page.url  # the bank is this browser's: its cookie brings it back
    page.goto(re.sub(r"/train\?.*", "/serve", page.url))
    wait_ready(page)
    see(page, "lora-times_3-2")
    assert page.locator(EXCEPTION).count() == 0


def test_a_teacher_link_hides_what_it_says_on_a_fresh_server(new_page):
    with app_server() as fresh:
        page = new_page()
        visit(page, f"{fresh}/train?task=sort&method=LoRA&r=2&only=r&hide=lr,steps")
        see(page, "An exercise from your teacher")
        sliders = page.get_by_test_id("stSlider")
        assert sliders.filter(has_text="Steps").count() == 0
        assert page.get_by_test_id("stSelectSlider").filter(has_text="Learning rate").count() == 0
        assert sliders.filter(has_text="r (rank)").get_by_test_id("stSliderThumbValue").inner_text() == "2"
        assert page.locator(EXCEPTION).count() == 0
