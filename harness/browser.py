"""Debian's chromium driven by Playwright (never `playwright install`): how it is launched for
a class of headless pages, and when a page of the app is ready."""
# Debian's headless build of chromium (package chromium-headless-shell): the same Blink and V8
# without the desktop browser's compositor, about half the CPU per page load (BENCHMARKS.md).
CHROMIUM = "/usr/bin/chromium-headless-shell"
# The last three keep timers and rendering of every page at full speed: Streamlit's live panel
# polls from the browser (st.fragment's run_every is a timer in the page), and a class of
# headless pages must not have theirs slowed as background tabs.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                 "--disable-backgrounding-occluded-windows"]
# A script run has ended and the page's title is drawn: every page starts with st.title, so a
# page still waiting for its first run (slow on a loaded machine) never counts as ready.
READY = "[data-testid=stApp][data-test-script-state=notRunning] [data-testid=stMain] h1"


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


# The page frame's styles are in effect (ui/frame.py sets this property with them): st.html
# mounts after the script has ended, and until then a phone shows the desktop's column order.
FRAME_STYLED = "getComputedStyle(document.documentElement).getPropertyValue('--peft-frame').trim() === '1'"


def wait_ready(page, timeout=60_000):
    """Wait until the app has finished running its script (and any fragment) and the page
    frame's styles apply."""
    page.wait_for_selector(READY, timeout=timeout)
    page.wait_for_timeout(300)  # let the last deltas paint
    page.wait_for_selector(READY, timeout=timeout)
    page.wait_for_function(FRAME_STYLED, timeout=timeout)


# What the app is held to: WCAG 2.2 AA (axe-core's tags for A and AA of 2.0, 2.1 and 2.2).
WCAG_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]


def axe_violations(page, tags=WCAG_AA):
    """axe-core's violations of `tags` on the page as it is now, each as one line (rule, impact,
    the first offending elements). The axe script is the copy bundled with axe-playwright-python:
    nothing is fetched."""
    from axe_playwright_python.sync_playwright import Axe
    results = Axe().run(page, options={"runOnly": {"type": "tag", "values": list(tags)}, "resultTypes": ["violations"]})
    return [f"{v['id']} ({v['impact']}): {v['help']} - " +
            "; ".join(" ".join(n["target"][-1:]) + " " + (n.get("failureSummary") or "").replace("\n", " ")[:160]
                      for n in v["nodes"][:3])
            for v in results.response["violations"]]
