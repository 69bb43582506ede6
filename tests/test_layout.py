"""The pages as a projector shows them, in a real browser at 1280x720 and 1440x900.

Nothing is cut off: no metric, formula, table or chart is clipped, ellipsised or scrolls
sideways. The storage chart reads plainly: log ticks 1, 10, 100; T* with the digits that
tell it from 1; the break-even marker drawn above the measured ones; the "saves" label
inside the plot on log axes too. Every asset comes from the app's own server (the
`new_page` fixture fails a test on any request to another host).

Each test writes a screenshot of the whole page to shots/ (gitignored): look at them.
"""
import re

import pytest

from harness.browser import wait_ready
from harness.servers import ROOT

SIZES = [(1280, 720), (1440, 900)]
SIZE_IDS = [f"{w}x{h}" for w, h in SIZES]
SHOTS = ROOT / "shots"
EXCEPTION = "[data-testid=stException]"

# What the eye would call "cut off", measured: for every element matching `selector` in the
# page's main area, neither it nor any descendant that clips its content (overflow other than
# visible, or an ellipsis) may hold content wider than its box, and its box must lie within
# the main area. (Content that overflows a box without clipping, as KaTeX's subscripts do, is
# seen by the clipping box around it. SVG has no scroll box: only its bounding box counts.)
CLIPPED_JS = """(selector) => {
  const main = document.querySelector('[data-testid=stMainBlockContainer]');
  const area = main.getBoundingClientRect();
  const what = (e) => `<${e.tagName.toLowerCase()} class="${e.getAttribute('class') || ''}">`;
  const out = [];
  for (const el of main.querySelectorAll(selector)) {
    const text = (el.innerText || el.textContent || '').replace(/\\s+/g, ' ').trim().slice(0, 70);
    for (const e of [el, ...el.querySelectorAll('*')]) {
      const style = getComputedStyle(e);
      const clips = style.overflowX !== 'visible' || style.textOverflow === 'ellipsis';
      if (e instanceof HTMLElement && clips && e.clientWidth > 1 && e.scrollWidth > e.clientWidth + 1)
        out.push(`${selector} ${what(e)} is ${e.scrollWidth}px wide in ${e.clientWidth}px: "${text}"`);
    }
    const r = el.getBoundingClientRect();
    if (r.width > 0 && (r.left < area.left - 1 || r.right > area.right + 1))
      out.push(`${selector} spans ${r.left.toFixed(0)}-${r.right.toFixed(0)}px, the page ` +
               `${area.left.toFixed(0)}-${area.right.toFixed(0)}px: "${text}"`);
  }
  return out;
}"""
WHOLE = ["[data-testid=stMetric]", ".katex-display", "[data-testid=stTable]", "[data-testid=stDataFrame]",
         "[data-testid=stMarkdownContainer]", "[data-testid=stPlotlyChart]", "[data-testid=stHorizontalBlock]"]


def open_page(new_page, url, path, size):
    page = new_page(*size)
    page.goto(f"{url}/{path}")
    wait_ready(page)
    page.wait_for_function("document.fonts.status === 'loaded'")  # KaTeX's fonts change its widths
    assert page.locator(EXCEPTION).count() == 0
    return page


def cut_off(page, selectors=WHOLE):
    problems = [p for s in selectors for p in page.evaluate(CLIPPED_JS, s)]
    main = page.evaluate("(() => { const m = document.querySelector('[data-testid=stMain]');"
                         " return [m.scrollWidth, m.clientWidth]; })()")
    if main[0] > main[1] + 1:
        problems.append(f"the page scrolls sideways: {main[0]}px wide in {main[1]}px")
    return problems


def shoot(page, name, size):
    """A screenshot of the whole page at this width (the window made as tall as the page,
    which changes no width), in shots/NAME-WxH.png; the window is put back afterwards."""
    SHOTS.mkdir(exist_ok=True)
    height = page.evaluate("document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": size[0], "height": max(size[1], height)})
    page.wait_for_timeout(500)  # plotly redraws on resize
    path = SHOTS / f"{name}-{size[0]}x{size[1]}.png"
    page.screenshot(path=path)
    page.set_viewport_size({"width": size[0], "height": size[1]})
    return path


def chart_drawn(page):
    """Wait until plotly has drawn the storage chart (it draws after the script has run)."""
    page.wait_for_selector("[data-testid=stPlotlyChart] .js-plotly-plot .draglayer .nsewdrag", state="attached")
    page.wait_for_timeout(500)


def tick_labels(page, axis):
    """The tick labels plotly shows on the storage chart's x or y axis, left to right or
    bottom to top (the hidden ones left out)."""
    return page.evaluate(f"""[...document.querySelectorAll('[data-testid=stPlotlyChart] .{axis}tick text')]
        .filter(t => getComputedStyle(t).display !== 'none' && t.getBoundingClientRect().width > 0)
        .map(t => t.textContent)""")


def as_numbers(labels):
    return [float(label.replace(",", "")) for label in labels]


def annotation_box(page, text):
    """The bounding box of the chart annotation containing `text`, and of the plot area."""
    return page.evaluate("""(text) => {
        const chart = document.querySelector('[data-testid=stPlotlyChart] .js-plotly-plot');
        const plot = chart.querySelector('.draglayer .nsewdrag').getBoundingClientRect();  // the plot area
        const note = [...chart.querySelectorAll('.annotation')].find(a => a.textContent.includes(text));
        const box = (r) => r && {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width};
        return {plot: box(plot), note: note ? box(note.getBoundingClientRect()) : null};
    }""", text)


def inside(box, area, slack=2):
    return (box["width"] > 0 and box["left"] >= area["left"] - slack and box["right"] <= area["right"] + slack
            and box["top"] >= area["top"] - slack and box["bottom"] <= area["bottom"] + slack)


# ------------------------------------------------------------------ offline
@pytest.mark.parametrize("path", ["", "train", "serve", "inside", "classroom"])
def test_every_asset_comes_from_the_app(new_page, url, path):
    """The favicon included: a ":material/...:" page_icon has the browser fetch it from
    fonts.gstatic.com on every page (the fixture fails the test on that request)."""
    page = open_page(new_page, url, path, SIZES[0])
    icon = page.evaluate("document.querySelector(\"link[rel~='icon']\").href")
    assert icon.startswith(("data:", url)), icon
    page.wait_for_timeout(500)  # room for a late request to show


# ------------------------------------------------------------------ the storage page
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_storage_page_is_whole(new_page, url, size):
    # the widest numbers the sliders allow: p = 0.015% (p = 0.00015) and T = 10,000
    page = open_page(new_page, url, "?p=0.015%25&T=10000", size)
    chart_drawn(page)
    path = shoot(page, "storage", size)
    assert not cut_off(page), f"{cut_off(page)} (see {path})"
    # T* with the digits that tell it from 1, in the formula and on the chart
    tex = page.locator(".katex-mathml annotation").all_text_contents()
    assert any(t.endswith("= 1.00015") and t.startswith("T^{*}") for t in tex), tex
    assert page.locator(".annotation-text", has_text="break-even T* = 1.00015").count() == 1
    assert any("10{,}000" in t and "0.00015" in t and t.rstrip(r"\, ").endswith(r"2.5 \end{aligned}") for t in tex), tex
    metric = page.get_by_test_id("stMetric").filter(has_text="phi fit beside the base")
    assert re.fullmatch(r"[\d,]+", metric.get_by_test_id("stMetricValue").inner_text().strip())


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_storage_log_axes_read_plainly(new_page, url, size):
    page = open_page(new_page, url, "?p=1%25&T=100&log=true", size)
    chart_drawn(page)
    for axis in "xy":  # 1 2 5 10 20 50 100, in order: not plotly's "1 2 5 10 2 5 100" in small type
        labels = tick_labels(page, axis)
        values = as_numbers(labels)
        assert values == sorted(set(values)) and len(values) >= 3, labels
        assert all(re.fullmatch(r"[125]0*", f"{v:g}") for v in values), labels
    assert tick_labels(page, "x")[0] == "1" and tick_labels(page, "x")[-1] == "100"

    # the break-even marker is drawn after (above) the session's measured phi markers
    order = page.evaluate("""document.querySelector('[data-testid=stPlotlyChart] .js-plotly-plot').data
        .map(t => (t.name || t.hovertemplate || '').split(':')[0])""")
    assert "measured" in order and "break-even" in order, order
    assert order.index("break-even") > order.index("measured"), order
    boxes = annotation_box(page, "saves")
    assert boxes["note"] and inside(boxes["note"], boxes["plot"]), boxes
    shoot(page, "storage-log", size)

    page.goto(f"{url}/?p=0.01%25&T=10000&log=true")
    wait_ready(page)
    chart_drawn(page)
    assert tick_labels(page, "x") == ["1", "10", "100", "1,000", "10,000"]
    assert tick_labels(page, "y") == ["1", "10", "100", "1,000", "10,000"]
    assert page.locator(".annotation-text", has_text="break-even T* = 1.0001").count() == 1
    boxes = annotation_box(page, "saves")
    assert boxes["note"] and inside(boxes["note"], boxes["plot"]), boxes

    page.get_by_test_id("stRadio").get_by_text("bytes").click()  # log axes in bytes: the label stays
    wait_ready(page)
    chart_drawn(page)
    boxes = annotation_box(page, "saves")
    assert boxes["note"] and inside(boxes["note"], boxes["plot"]), boxes
    assert not cut_off(page)
    shoot(page, "storage-log-bytes", size)


def test_a_bad_value_in_a_link_is_reported(page, url, sync_api):
    page.goto(f"{url}/?p=abc&T=-5")
    wait_ready(page)
    toasts = page.get_by_test_id("stToast")
    sync_api.expect(toasts.filter(has_text="p='abc'")).to_contain_text("reset to 1%")
    sync_api.expect(toasts.filter(has_text="T='-5'")).to_contain_text("reset to 100")
    assert "abc" not in page.url and "T=-5" not in page.url
    assert page.locator("h2").first.inner_text().startswith("With 100 tasks at 1%")


# ------------------------------------------------------------------ the other pages
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_serve_page_is_whole(new_page, url, size, sync_api):
    page = open_page(new_page, url, "serve", size)
    assert page.get_by_test_id("stMetric").filter(has_text="unmerged").count() == 1  # the merge panel measured
    page.get_by_role("button", name="Serve as one mixed batch").click()
    # waited for, not read at once: the click's script run may not have begun when wait_ready looks
    sync_api.expect(page.get_by_text("Why the sort rows are wrong")).to_be_visible(timeout=120_000)  # lora-sort is served by default
    wait_ready(page, timeout=120_000)
    assert page.locator(EXCEPTION).count() == 0
    path = shoot(page, "serve", size)
    assert not cut_off(page), f"{cut_off(page)} (see {path})"


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_inside_page_is_whole(new_page, url, size):
    page = open_page(new_page, url, "inside", size)
    path = shoot(page, "inside", size)
    assert not cut_off(page), f"{cut_off(page)} (see {path})"


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_train_page_is_whole(new_page, url, size, sync_api):
    """Every control in view, "down" among the target_modules pills included (in a column,
    pills scroll sideways unless told to wrap), and the seed note in full."""
    page = open_page(new_page, url, "train?task=sort", size)
    # a widget's code loads lazily in a new browser context: wait for it, not just the script
    sync_api.expect(page.get_by_role("toolbar", name="target_modules").get_by_role("button")).to_have_count(6)
    assert page.get_by_text("Sorting compares").count() == 1
    path = shoot(page, "train", size)
    whole = WHOLE + ["[data-testid=stButtonGroup]"]
    assert not cut_off(page, whole), f"{cut_off(page, whole)} (see {path})"
    page.get_by_test_id("stRadio").get_by_text("Race", exact=True).click()  # the race: every method named
    wait_ready(page)
    sync_api.expect(page.get_by_role("toolbar", name="Methods").get_by_role("button", name="Full fine-tuning")
                    ).to_be_visible()
    path = shoot(page, "train-race", size)
    assert not cut_off(page, whole), f"{cut_off(page, whole)} (see {path})"


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
def test_class_page_is_whole(new_page, url, size, base):
    """The board of a class with a phi of every kind, its chart and its serving panel, as a
    student who opens the class link sees them (the class made in the server's own store)."""
    import os

    import peftcore
    from peftcore import library
    from peftcore.service.store import Store, new_token
    store = Store(os.environ["PEFT_STORE"], base=base)
    code, _ = store.create_class("Period 3")
    for i, (name, directory) in enumerate(library.entries()[:6]):
        model = peftcore.PeftModel.from_pretrained(base, directory)
        exact = peftcore.evaluate(model, model.adapter_task["default"])[0]  # as the page measures it
        store.save_phi(new_token(), name, peftcore.adapter_to_bytes(model, "default"), class_code=code,
                       eval_exact=exact, author=f"Student number {i}")
    page = open_page(new_page, url, f"classroom?class={code}", size)
    page.get_by_text("6 phi in the class").wait_for()
    path = shoot(page, "class", size)
    whole = WHOLE + ["[data-testid=stButtonGroup]"]
    assert not cut_off(page, whole), f"{cut_off(page, whole)} (see {path})"
