"""Screenshots for the README: the storage chart and a finished training race; and every
page as a projector shows it.

    python -m bench.screenshots [--steps 300] [--task times_3] [--out docs] [--all]
    python -m bench.screenshots --projector [--out shots]

Starts `streamlit run app.py`, drives it with headless chromium and writes
docs/storage.png and docs/race.png (with --all, also serve.png and inside.png).
With --projector: each page at 1280x720 and at 1440x900, the whole page (the window
made as tall as the page, which changes no width), as shots/PAGE-WxH.png; shots/ is
gitignored. tests/test_layout.py asserts what can be (nothing clipped, plain log ticks...).
"""
import argparse
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from harness.browser import launch_chromium, wait_ready
from harness.servers import ROOT, app_server

VIEWPORT = {"width": 1600, "height": 1000}
PROJECTORS = [(1280, 720), (1440, 900)]
PAGES = {"storage": "?p=0.015%25&T=10000", "storage-log": "?p=1%25&T=100&log=true",
         "train": "train", "serve": "serve", "inside": "inside", "class": "classroom"}


def set_slider(page, label, clicks):
    """Move a slider with the keyboard: Home, then `clicks` steps right."""
    page.get_by_test_id("stSlider").filter(has_text=label).get_by_role("slider").focus()
    page.keyboard.press("Home")
    for _ in range(clicks):
        page.keyboard.press("ArrowRight")
    wait_ready(page)


def choose(page, label, option):
    """Pick `option` in the selectbox labelled `label`."""
    page.get_by_test_id("stSelectbox").filter(has_text=label).click()
    page.get_by_role("option", name=option, exact=True).click()
    wait_ready(page)


def storage(page, url, out):
    page.goto(f"{url}/?p=1%25&T=100")
    wait_ready(page)
    page.screenshot(path=out / "storage.png")


def race(page, url, out, steps, task, timeout_s=900):
    page.goto(f"{url}/train")
    wait_ready(page)
    page.get_by_text("Race", exact=True).click()
    wait_ready(page)
    choose(page, "Task", task)
    set_slider(page, "Steps (each method)", (steps - 10) // 10)
    page.get_by_role("button", name="Train", exact=True).click()
    page.wait_for_selector("text=Stop", timeout=60_000)
    deadline = time.time() + timeout_s
    while page.get_by_text("Results on").count() == 0:  # the fragment polls; the page reruns when all end
        if time.time() > deadline:
            raise TimeoutError("the race did not finish in time")
        page.wait_for_timeout(1000)
    wait_ready(page)
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 1500})  # curves and the results table
    wait_ready(page)
    page.screenshot(path=out / "race.png")
    page.set_viewport_size(VIEWPORT)


def other_pages(page, url, out):
    for path in ("serve", "inside"):
        page.goto(f"{url}/{path}")
        wait_ready(page)
        page.screenshot(path=out / f"{path}.png")


def whole_page(page, path, width, height):
    """Screenshot the whole page at this width; the window is put back afterwards."""
    full = page.evaluate("document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": width, "height": max(height, full)})
    page.wait_for_timeout(500)  # plotly redraws on resize
    page.screenshot(path=path)
    page.set_viewport_size({"width": width, "height": height})


def projector(browser, url, out):
    written = []
    for width, height in PROJECTORS:
        page = browser.new_page(viewport={"width": width, "height": height})
        for name, path in PAGES.items():
            page.goto(f"{url}/{path}")
            wait_ready(page)
            page.wait_for_function("document.fonts.status === 'loaded'")
            written.append(out / f"{name}-{width}x{height}.png")
            whole_page(page, written[-1], width, height)
        page.close()
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300,
                    help="steps per method in the race (10-1000); 300, the live budget: every method that solves times_3 in one shows it")
    ap.add_argument("--task", default="times_3")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--all", action="store_true", help="also the serving and inside pages")
    ap.add_argument("--projector", action="store_true",
                    help=f"every page at {' and '.join(f'{w}x{h}' for w, h in PROJECTORS)} into --out (default shots)")
    args = ap.parse_args()
    if args.projector:
        out = ROOT / "shots" if args.out == ROOT / "docs" else args.out
        out.mkdir(parents=True, exist_ok=True)
        with app_server() as url, sync_playwright() as pw:
            browser = launch_chromium(pw)
            written = projector(browser, url, out)
            browser.close()
        print("wrote " + ", ".join(str(p) for p in written))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with app_server() as url, sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport=VIEWPORT)
        storage(page, url, args.out)
        race(page, url, args.out, args.steps, args.task)
        if args.all:
            other_pages(page, url, args.out)
        browser.close()
    names = ["storage", "race"] + (["serve", "inside"] if args.all else [])
    print("wrote " + ", ".join(str(args.out / f"{n}.png") for n in names))


if __name__ == "__main__":
    main()
