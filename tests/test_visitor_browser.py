"""What a visitor meets in a real browser (issue 13): every chart the browser draws has axis
titles with text (read from the rendered SVG, not the figure dict), the visitor's bank and
class survive a sidebar click and a refresh, a teacher stays a teacher across a reload and
a wrong key is told so, and the exercise link names the host the teacher's browser used."""
from harness.browser import wait_ready
from test_browser import EXCEPTION, press, see, short_run, start_class, visit

TITLES = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(plot =>
    Array.from(plot.querySelectorAll('.g-xtitle text, .g-ytitle text, .g-y2title text'))
         .map(t => t.textContent.trim()).filter(Boolean))"""


def drawn_titles(page, charts):
    """The axis titles of each chart on the page, once `charts` charts are drawn."""
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {charts}",
                           timeout=60_000)
    page.wait_for_timeout(500)
    return page.evaluate(TITLES)


def test_every_chart_the_browser_draws_has_axis_titles(page, url):
    visit(page, url)
    assert drawn_titles(page, 1) == [["number of tasks T", "storage (base models)"]]

    visit(page, f"{url}/train")
    short_run(page)
    assert drawn_titles(page, 2) == [["step", "training loss", "exact match (%)"], ["answer digit", "right (%)"]]

    visit(page, f"{url}/inside")
    for steps, button, done in [("Steps of full fine-tuning", "Fine-tune fully", "top 4 directions"),
                                ("Steps", "Train both", "random base: held-out exact match")]:
        press(page, page.locator(f'input[type=range][aria-label="{steps}"]'), "Home")
        wait_ready(page)
        page.get_by_role("button", name=button, exact=True).click()
        see(page, done, timeout=180_000)
        wait_ready(page)
    titles = drawn_titles(page, 3)
    assert ["k (rank)", "% of energy"] in titles
    assert titles.count(["step", "training loss", "exact match (%)"]) == 2  # the two experiments' curves
    assert page.locator(EXCEPTION).count() == 0


def test_the_bank_and_the_class_survive_a_sidebar_click_and_a_refresh(page, url):
    code = start_class(page, url, "Kept")
    page.get_by_test_id("stSidebarNav").get_by_text("Train a sliver").click()
    wait_ready(page)
    short_run(page)
    page.get_by_role("button", name="Save to my bank").click()
    see(page, "Saved lora-times_3-")
    page.get_by_test_id("stSidebarNav").get_by_text("Many tasks at once").click()
    wait_ready(page)
    page.reload()
    wait_ready(page)
    see(page, "lora-times_3-2")  # the saved phi is in the bank after a page switch and F5
    assert "bank=" not in page.url and f"class={code}" in page.url  # the bank is this browser's, not the link's
    page.get_by_test_id("stSidebarNav").get_by_text("Class").click()
    wait_ready(page)
    see(page, f"join code {code}")  # no code to type again
    page.reload()
    wait_ready(page)
    see(page, "Close the class")  # still the teacher after a reload
    assert page.locator(EXCEPTION).count() == 0


def test_a_wrong_teacher_key_is_told_and_the_exercise_link_names_this_host(new_page, url):
    code = start_class(new_page(), url, "Keys")

    student = new_page()
    visit(student, f"{url}/classroom?class={code}")
    student.get_by_text("I am the teacher of this class").click()
    student.get_by_label("Teacher key").fill("a-wrong-key-of-the-right-shape-123")
    student.get_by_role("button", name="Use this key").click()
    wait_ready(student)
    see(student, "That is not this class's teacher key")
    assert student.get_by_text("That is not this class's teacher key").first.is_visible()

    visit(student, f"{url}/train")
    student.get_by_text("Copy link for the class").click()
    link = student.get_by_test_id("stCode").first.inner_text()
    assert link.startswith(f"{url}/train?"), link
