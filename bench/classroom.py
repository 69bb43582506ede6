"""A class on one server: N students press Train at about the same moment, in real browsers.

    python -m bench.classroom N [N ...] [--race] [--distinct-seeds] [--steps S] [--timeout T] [--executor ray]
                              [--servers K]

For each N: a fresh `streamlit run` (harness.servers; --servers K: K of them on one fresh
`ray start --head`, student i on server i mod K), one headless Chromium with N+1
contexts (one visitor each, background throttling off; it and Playwright's driver at the
lowest CPU priority, SCHED_IDLE). The N students open /train, wait
for the app, set their seed / mode / steps, and press Train together (a barrier; the pages
are driven concurrently with Playwright's async API). Meanwhile the extra session moves the
p slider of the storage page (/) again and again. Then the same runs train in this process
with peftcore alone, N at once in threads (one torch thread each), timed in the same
invocation, and a markdown table is printed.

Per student, measured in the page (Date.now(), recorded by a MutationObserver):
  click -> first curve   the first plotly trace with points, or a progress line at step > 0
  click -> result        the "Results on <task>" heading
  steps/s seen           the "N.N steps/s" of the progress lines at the end, per run
  live updates/s         how often the progress text changes while the run trains (step > 0
                         shown, until the result); "max gap" is the longest wait between two
  in line                whether a waiting student was ever shown text with "in line"
  exceptions             [data-testid=stException] elements, plus the text of st.error boxes
Server side (the server's /proc, every thread, exited ones included; the server runs with
harness.servers's thread_probe, which gives Python's thread names to the OS and logs each
thread's CPU, and a script thread's Streamlit session, when it exits):
  server CPU             over click -> last result, split into training threads (Python
                         thread name "run-...", as peftcore.service.runs names them) and the rest:
                         event loop, script and fragment reruns, the clicks, result cards.
  page CPU per update    over the live updates every student saw from the first step any
                         student saw to the first result card (only live panels run then):
                         all = the server's CPU but its training threads, counted in the
                         seconds when the storage page is idle (it reruns in bursts, with
                         quiet gaps between); scripts = the students' own script and fragment
                         runs (their script threads). The whole class's figures, the clicks
                         and result cards included, are printed below the table.
  storage rerun          the storage page's script runs while the class trains, after an
                         arrow key on the p slider: the server wall time of each (its script
                         thread's life, p50/p95). Printed below the table: the same runs as the
                         page saw them (data-test-script-state "running" -> "notRunning"), key
                         -> redrawn headline, and the page with nothing else running.
Core alone: the same configs, seeds, steps and eval_every, peftcore.run, every distinct run
at once in its own thread; "ratio" = last click -> result in the app over the last
core-alone run's seconds. Identical runs are one computation (the app shares them), so
without --distinct-seeds the core alone trains one run (or one race) whatever N is.
"""
import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from bench.common import LiveUpdates, fmt, pct
from harness.browser import CHROMIUM, CHROMIUM_ARGS, READY
from harness.servers import CLK_TCK, proc_cpu_seconds, ray_head, streamlit_server

# ------------------------------------------------------------------ what the pages show
# The texts and selectors this benchmark (and tests/test_classroom.py) depends on.
TRAIN = "Train"                           # the train page's button (exact name)
RESULTS = "Results on"                    # the heading above the result cards: "Results on <task>"
PROGRESS = "[data-testid=stProgress]"     # one per run: "... · step 12/300 · 4.5 steps/s · ..."
STEP_RE = re.compile(r"\bstep (\d+)/(\d+)")
RATE_RE = re.compile(r"(\d+(?:\.\d+)?) steps/s")
IN_LINE_RE = r"\bin line\b"               # a queued student's place in line (any text on the page)
TRAINING_THREADS = ("run-",)              # server threads that train (peftcore.service.runs names them)
VIEWPORT = {"width": 1400, "height": 1000}
IDLE_MOVES = 6                            # storage reruns timed before the class starts

# Installed in each student's page before the click. Records, with Date.now() timestamps,
# every change of the progress text, the first curve with points, the results heading,
# "in line", exceptions and error boxes, and the moment the Train button is clicked.
PROBE = r"""
([train, results, inLine, progress]) => {
  if (window.__classroom) return;
  const log = window.__classroom = {progress: [], firstCurve: null, result: null, resultText: null,
      inLine: null, inLineText: null, exceptions: 0, errors: [], click: null};
  const inLineAny = new RegExp(inLine, "i"), inLineRe = new RegExp(`.{0,60}${inLine}.{0,60}`, "i");
  let last = null;
  const check = () => {
    const now = Date.now();
    const text = Array.from(document.querySelectorAll(progress), e => e.textContent.trim()).join(" | ");
    if (text !== last) { last = text; log.progress.push([now, text]); }
    if (log.firstCurve === null && Array.from(document.querySelectorAll(".js-plotly-plot"), g => g.data || [])
        .some(d => d.some(t => t.x && t.x.length > 0))) log.firstCurve = now;
    if (log.result === null) {
      const h = Array.from(document.querySelectorAll("h1, h2, h3, h4, h5, h6"))
        .find(h => h.textContent.trim().startsWith(results));
      if (h) { log.result = now; log.resultText = h.textContent.trim(); }
    }
    log.exceptions = Math.max(log.exceptions, document.querySelectorAll("[data-testid=stException]").length);
    for (const e of document.querySelectorAll("[data-testid=stException], [data-testid=stAlertContentError]")) {
      const t = e.textContent.trim().slice(0, 300);
      if (!log.errors.includes(t)) log.errors.push(t);
    }
  };
  const scan = () => {  // the whole page's text: on a timer, not on every mutation
    check();
    const main = document.querySelector("[data-testid=stMain]");
    if (log.inLine === null && main && inLineAny.test(main.textContent)) {
      const el = Array.from(main.querySelectorAll("[data-testid=stMarkdownContainer]"))
        .find(e => inLineAny.test(e.textContent));
      log.inLine = Date.now();
      log.inLineText = (el ? el.textContent : main.textContent.match(inLineRe)[0]).trim().slice(0, 200);
    }
  };
  new MutationObserver(check).observe(document.body, {subtree: true, childList: true, characterData: true});
  setInterval(scan, 200);
  document.addEventListener("click", ev => {
    const b = ev.target.closest && ev.target.closest("button");
    if (log.click === null && b && b.textContent.trim() === train) log.click = Date.now();
  }, true);
  scan();
}
"""

# On the storage page: every change of the app's script state, timestamped.
STATE_PROBE = r"""
() => {
  if (window.__states) return;
  const app = document.querySelector("[data-testid=stApp]");
  window.__states = [[Date.now(), app.dataset.testScriptState]];
  new MutationObserver(() => window.__states.push([Date.now(), app.dataset.testScriptState]))
    .observe(app, {attributes: true, attributeFilter: ["data-test-script-state"]});
}
"""
HEADLINE_CHANGED = r"""
(before) => {
  const h = document.querySelector("[data-testid=stMain] h2");
  const app = document.querySelector("[data-testid=stApp]");
  return h && h.textContent !== before && app.dataset.testScriptState === "notRunning";
}
"""


# ------------------------------------------------------------------ one student
@dataclass
class Student(LiveUpdates):
    index: int
    seed: int = None                # set in the sidebar (--distinct-seeds), else the app's default
    pressed: float = None           # epoch s, just before the click
    log: dict = field(default_factory=dict)
    error: str = ""                 # what went wrong on the Python side (a timeout...)

    @property
    def clicked(self):
        c = self.log.get("click")
        return c / 1000 if c else self.pressed

    @property
    def first_step(self):
        """Epoch s of the first progress text at step > 0."""
        for t, text in self.log.get("progress", []):
            if any(int(s) > 0 for s, _ in STEP_RE.findall(text)):
                return t / 1000
        return None

    @property
    def to_first_curve(self):
        times = [t for t in (self.log.get("firstCurve") and self.log["firstCurve"] / 1000, self.first_step) if t]
        return min(times) - self.clicked if times and self.clicked else None

    @property
    def result_at(self):
        r = self.log.get("result")
        return r / 1000 if r else None

    @property
    def to_result(self):
        return self.result_at - self.clicked if self.result_at and self.clicked else None

    def updates(self, start=None, end=None):
        """Progress text changes (epoch s) from `start` to `end`."""
        return [t / 1000 for t, _ in self.log.get("progress", [])
                if (start is None or t / 1000 >= start) and (end is None or t / 1000 <= end)]

    def live_steps(self):
        """The steps shown part-way through a run (0 < step < budget), in order."""
        return [int(a) for _, text in self.log.get("progress", [])
                for a, b in STEP_RE.findall(text) if 0 < int(a) < int(b)]

    @property
    def steps_per_s(self):
        """The progress lines' own steps/s at the end (one per run), else steps / elapsed."""
        progress = self.log.get("progress") or [[0, ""]]
        rates = [float(r) for r in RATE_RE.findall(progress[-1][1])]
        if rates:
            return rates
        steps = [int(s) for s, _ in STEP_RE.findall(progress[-1][1])]
        if steps and self.first_step and self.result_at and self.result_at > self.first_step:
            return [s / (self.result_at - self.first_step) for s in steps]
        return []

    @property
    def saw_queue(self):
        """Whether this student was shown a waiting run (queued, waiting or a place in line)."""
        return bool(self.log.get("inLine")) or any(
            re.search(r"\b(queued|waiting)\b", text) for _, text in self.log.get("progress", []))


# ------------------------------------------------------------------ driving pages
async def wait_ready(page, timeout=60_000):
    """The async twin of harness.servers.wait_ready."""
    await page.wait_for_selector(READY, timeout=timeout)
    await page.wait_for_timeout(300)  # let the last deltas paint
    await page.wait_for_selector(READY, timeout=timeout)


async def new_page(browser, foreign=None):
    """A page in a fresh context (its own cookies: its own visitor). Requests to any host
    but the app's own server go to the list `foreign` (the app works offline)."""
    context = await browser.new_context(viewport=VIEWPORT)
    if foreign is not None:
        def check(request):
            where = urlparse(request.url)
            if where.scheme in ("http", "https", "ws", "wss") and where.hostname not in ("127.0.0.1", "localhost"):
                foreign.append(request.url)
        context.on("request", check)
    return await context.new_page()


async def set_device(page, device):
    """Pick `device` in the sidebar's Device box, unless it is already picked."""
    box = page.get_by_test_id("stSidebar").get_by_role("combobox", name="Device")
    if await box.input_value() != device:
        await box.click()
        await page.get_by_role("option", name=device, exact=True).click()
        await wait_ready(page)
    shown = await box.input_value()
    assert shown == device, f"the Device box shows {shown!r}, not {device!r}"


async def set_seed(page, seed):
    box = page.get_by_test_id("stSidebar").get_by_role("spinbutton", name="Seed")
    await box.fill(str(seed))
    await box.press("Enter")
    await wait_ready(page)
    value = await box.input_value()
    assert value == str(seed), f"the Seed box shows {value!r}, not {seed}"


async def set_race(page):
    await page.get_by_test_id("stRadio").get_by_text("Race", exact=True).click()
    await wait_ready(page)


async def set_steps(page, steps):
    """Move the (first) Steps slider to `steps` with the keyboard: Home, then arrows (10 a step)."""
    slider = page.get_by_test_id("stSlider").filter(has_text="Steps").first.get_by_role("slider")
    await slider.press("Home")  # keyed on the slider itself: a rerun between keys cannot move the focus
    low = int(await slider.get_attribute("aria-valuemin") or 10)
    for _ in range((steps - low) // 10):
        await slider.press("ArrowRight")
    await page.wait_for_timeout(500)  # the slider sends its value once the keys stop
    await wait_ready(page)
    shown = await slider.get_attribute("aria-valuenow") or await slider.get_attribute("aria-valuetext")
    assert shown == str(steps), f"the Steps slider shows {shown}, not {steps}"


async def open_student(browser, url, student, race, steps, device, gate, foreign):
    async with gate:  # a few pages load at a time: a fresh server loads its base first
        page = await new_page(browser, foreign)
        await page.goto(f"{url}/train")
        await wait_ready(page, timeout=180_000)
        if device is not None:
            await set_device(page, device)
        if student.seed is not None:
            await set_seed(page, student.seed)
        if race:
            await set_race(page)
        if steps is not None:
            await set_steps(page, steps)
        await page.evaluate(PROBE, [TRAIN, RESULTS, IN_LINE_RE, PROGRESS])
    return page


async def press_and_watch(page, student, go, deadline):
    await go.wait()
    student.pressed = time.time()
    try:
        # up to the class's deadline: on 2 cores the pages run at the lowest priority beside the
        # training, and with 30 of them a click may wait minutes for its renderer (a timeout here
        # would count a student the app served as a missing result)
        await page.get_by_role("button", name=TRAIN, exact=True).click(timeout=1000 * max(60.0, deadline - time.time()))
        left = max(1.0, deadline - time.time())
        await page.wait_for_function("() => window.__classroom.result !== null", polling=250, timeout=1000 * left)
        await page.wait_for_timeout(500)  # the result cards' own rerun: an exception there counts too
    except Exception as e:  # a timeout, a closed page: recorded, the others carry on
        student.error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    try:
        student.log = await page.evaluate("() => window.__classroom")
    except Exception as e:
        student.error = student.error or f"{type(e).__name__}: {str(e).splitlines()[0]}"


# ------------------------------------------------------------------ the storage page
@dataclass
class StorageProbe:
    """Reruns of the storage page: key -> redrawn headline (client), and script-state
    running -> notRunning (server) intervals."""
    page: object
    moved: list = field(default_factory=list)   # (epoch s of the key press, s to the redrawn headline)
    quiet: list = field(default_factory=list)   # (epoch s, epoch s): no storage rerun in between
    window: tuple = (0, 0)

    @classmethod
    async def open(cls, browser, url, foreign=None):
        page = await new_page(browser, foreign)
        await page.goto(url)
        await wait_ready(page, timeout=180_000)
        await page.evaluate(STATE_PROBE)
        return cls(page)

    async def move(self, key):
        slider = self.page.get_by_test_id("stSlider").first.get_by_role("slider")
        before = await self.page.locator("[data-testid=stMain] h2").first.text_content()  # the chart's sentence
        await slider.focus()
        t0 = time.time()
        await self.page.keyboard.press(key)
        await self.page.wait_for_function(HEADLINE_CHANGED, arg=before, polling=10, timeout=120_000)
        self.moved.append((t0, time.time() - t0))

    async def moves(self, n=None, stop=None, burst=4, pause=0.3, quiet=3.0):
        """ArrowRight and ArrowLeft in turn (p 1% <-> 1.5%): `n` moves back to back, or until
        `stop` is set in bursts of `burst` moves `pause` s apart, then `quiet` s without a
        move (recorded in self.quiet: the server's page CPU is measured then)."""
        start, i = time.time(), 0
        while (n is None or i < n) and not (stop and stop.is_set()):
            await self.move("ArrowRight" if i % 2 == 0 else "ArrowLeft")
            i += 1
            if stop:
                settled = time.time() + 0.5  # its script thread exits, its last deltas go out
                await wait_or(stop, pause if i % burst else quiet)
                if not i % burst and time.time() > settled:
                    self.quiet.append((settled, time.time()))
        self.window = (start, time.time())
        return i

    async def script_seconds(self):
        """running -> notRunning intervals that began inside the last moves() window."""
        states = await self.page.evaluate("() => window.__states")
        out, began = [], None
        for t, state in states:
            t /= 1000
            if state == "running":
                began = began or t
            elif state == "notRunning" and began:
                if self.window[0] <= began <= self.window[1]:
                    out.append(t - began)
                began = None
        return out


def script_walls(server, sessions, start, end):
    """Server wall seconds of the script runs of `sessions` that began and ended in [start, end]:
    each is a script thread's life (harness.servers's thread probe)."""
    server.thread_cpu()  # reads the probe's log on
    return [wall for session, ended, wall in server.script_runs
            if session in sessions and start <= ended - wall and ended <= end]


def cpu_sample(server, sessions=()):
    """(epoch s, then CPU s since the server started: the whole server, its training threads,
    the script runs of the Streamlit `sessions`, the script runs of all other sessions).
    A script thread counts once it has exited (it lives for one run or a few)."""
    threads = server.thread_cpu()
    return (time.time(), server.cpu_seconds(),
            sum(cpu for key, cpu in threads.items() if key.name.startswith(TRAINING_THREADS)),
            sum(cpu for key, cpu in threads.items() if key.session and key.session in sessions),
            sum(cpu for key, cpu in threads.items() if key.session and key.session not in sessions))


async def script_sessions(server, timeout=10):
    """The Streamlit sessions that have run a script so far (their script threads exited)."""
    deadline = time.time() + timeout
    while True:
        sessions = {key.session for key in server.thread_cpu() if key.session}
        if sessions or time.time() > deadline:
            return sessions
        await asyncio.sleep(0.2)


async def sample_cpu(server, stop, sessions=(), every=0.5):
    """[cpu_sample(server, sessions)] every `every` s until `stop` is set."""
    samples = []
    while True:
        samples.append(cpu_sample(server, sessions))
        if stop.is_set():
            return samples
        await wait_or(stop, every)


async def wait_or(event, seconds):
    """Sleep `seconds`, or less if `event` is set meanwhile."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass


def descendants_cpu(root, skip=()):
    """CPU s (user + system, with their reaped children's) of the processes below `root`,
    outside the process trees of the pids in `skip`: here the browsers and Playwright's
    driver, not the server."""
    parent, cpu = {}, {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(pid)] = int(fields[1])
            cpu[int(pid)] = sum(int(f) for f in fields[11:15]) / CLK_TCK

    def below(pid):
        while pid in parent and pid not in skip:
            pid = parent[pid]
            if pid == root:
                return True
        return False
    return sum(c for pid, c in cpu.items() if pid not in skip and below(pid))


def renice_below(root, skip=()):
    """Give the processes below `root`, outside the trees of the pids in `skip` (the servers,
    a Ray head), the lowest CPU priority: SCHED_IDLE (they run only on a core nothing else
    wants) and nice 19, every thread of each. Not nice alone: chromium sets its renderers'
    nice itself (0, 5, -8 as root), which undid nice 19 (measured: renderers at 0 and 5, the
    browsers at 78% of the cores); a scheduling policy it leaves alone, and a forked child
    (a new page's renderer) inherits it."""
    for pid in _below(root, skip):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:  # it exited meanwhile
            continue
        for tid in tids:
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, 19)
            except OSError:
                pass


def _below(root, skip=()):
    parent = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                parent[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out = []
    for pid in parent:
        p = pid
        while p in parent and p not in skip and pid not in skip:
            p = parent[p]
            if p == root:
                out.append(pid)
                break
    return out


def machine_busy():
    """CPU s the whole machine has been busy (every core, every process), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK  # all but idle and iowait


def own_cpu():
    """CPU s of this process and every process below it (servers, Ray, browsers)."""
    return proc_cpu_seconds("/proc/self/stat") + descendants_cpu(os.getpid())


def cpu_by_thread(before, after):
    """CPU s between two thread_cpu() readings, by thread name ("run-1a2b" -> "run-*")."""
    out = {}
    for key, cpu in after.items():
        name = re.sub(r"[-_.]?[0-9a-f]{6,}$|[-_]\d+$", "*", key.name)
        out[name] = out.get(name, 0.0) + cpu - before.get(key, 0.0)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def at(samples, t):
    """A cpu_sample at epoch `t` (without its time), interpolated between samples."""
    for (t0, *a), (t1, *b) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            w = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
            return tuple(x + w * (y - x) for x, y in zip(a, b))
    return tuple(samples[0][1:] if t < samples[0][0] else samples[-1][1:])


# ------------------------------------------------------------------ the class
@dataclass
class ClassResult:
    n: int
    race: bool
    distinct: bool
    steps: int
    task: str
    students: list
    cpu: list = field(default_factory=list)          # sample_cpu, from the click to the last result
    storage_cpu_each: float = 0.0    # server CPU s per storage rerun, measured with nothing else running
    storage_script_cpu_each: float = 0.0  # of which its script run (the storage session's thread)
    storage_quiet: list = None       # (epoch s, epoch s) without a storage rerun; None: no storage page
    storage_idle_s: list = field(default_factory=list)    # its script runs then, server wall s
    storage_idle_client_s: list = field(default_factory=list)  # the same runs as the page saw them
    storage_moved: list = field(default_factory=list)     # (epoch s, key -> headline s) while the class trains
    storage_script_s: list = field(default_factory=list)  # script runs while the class trains, server wall s
    storage_client_s: list = field(default_factory=list)  # the same as the page saw them (script state)
    core: dict = None                # core-alone timings
    server_errors: list = field(default_factory=list)    # lines of the server's log
    foreign: list = field(default_factory=list)          # requests to hosts other than the app's
    phases: dict = field(default_factory=dict)           # s spent: server start, seating, class
    by_thread: dict = field(default_factory=dict)        # server CPU s over the class by thread name
    browser_cpu: float = 0.0                             # s, chromium + Playwright's driver over the class
    other_cpu: float = 0.0           # s, the machine's CPU over the class outside this benchmark (others' jobs)
    executor: str = "inprocess"
    servers: int = 1

    @property
    def results(self):
        return [s for s in self.students if s.to_result is not None]

    @property
    def exceptions(self):
        return sum(s.log.get("exceptions", 0) for s in self.students)

    @property
    def errors(self):
        return [e for s in self.students for e in s.log.get("errors", [])] + [s.error for s in self.students if s.error]

    @property
    def live_updates(self):
        return sum(len(s.updates()) for s in self.students)

    def cpu_between(self, start, end):
        """CPU s from `start` to `end` (epoch s) and what the students saw meanwhile:
        dict(server, training, storage: the storage session's script runs, scripts: the
        students' script and fragment runs, page: server - training - storage, updates)."""
        server, training, storage, scripts = (b - a for a, b in zip(at(self.cpu, start), at(self.cpu, end)))
        return dict(server=server, training=training, storage=storage, scripts=scripts,
                    page=server - training - storage, updates=sum(len(s.updates(start, end)) for s in self.students))

    @property
    def whole(self):
        """cpu_between over the whole class: the clicks, the live panels, the result cards."""
        return self.cpu_between(self.cpu[0][0], self.cpu[-1][0]) if self.cpu else None

    @property
    def steady_window(self):
        """(start, end) while only live panels run: from the first step any student saw to
        the first result card; the whole class when that is under two CPU samples long."""
        if not self.cpu:
            return None
        firsts = [s.first_step for s in self.students if s.first_step]
        ends = [s.result_at for s in self.students if s.result_at]
        if firsts and ends and sum(min(firsts) <= c[0] <= min(ends) for c in self.cpu) >= 2:
            return min(firsts), min(ends)
        return self.cpu[0][0], self.cpu[-1][0]

    @property
    def live_panels(self):
        """The server's work for live panels: dict(scripts, updates) over the steady window,
        and dict(page, page_updates, quiet_s) over its parts with no storage rerun going on
        (all of it without a storage page), where page CPU is all the server's but training."""
        window = self.steady_window
        if window is None:
            return None
        start, end = window
        out = {k: v for k, v in self.cpu_between(start, end).items() if k in ("scripts", "updates")}
        quiet = [(start, end)] if self.storage_quiet is None else [
            (max(a, start), min(b, end)) for a, b in self.storage_quiet if min(b, end) - max(a, start) >= 1.0]
        parts = [self.cpu_between(a, b) for a, b in quiet]
        out.update(page=sum(p["page"] for p in parts), page_updates=sum(p["updates"] for p in parts),
                   quiet_s=sum(b - a for a, b in quiet))
        return out

    def per_update(self, what="page"):
        """Server CPU s per live update a student saw, while only live panels run: "page"
        (all the server's work but training, measured when no storage rerun goes on) or
        "scripts" (the students' own script and fragment runs)."""
        lp = self.live_panels
        n = lp and lp["page_updates" if what == "page" else "updates"]
        return lp[what] / n if n else None


async def run_class(n, race=False, distinct=False, steps=None, device=None, timeout=900, storage=True, flags=(),
                    load_at_once=4, server_timeout=120, executor="inprocess", servers=1):
    """Start a server, seat n students, press Train together, measure; returns a ClassResult.

    race: Mode Race; distinct: student i sets Seed i+1; steps: the Steps slider (None: the
    preset's); device: the sidebar's Device (None: the app's default); timeout: seconds from
    the click to the last result; storage: also time the storage page in another session;
    flags: extra `streamlit run` flags; executor: where the server trains ("inprocess", or
    "ray": worker processes of a local Ray the app starts, one per core); servers: web servers
    (more than one: executor "ray", one `ray start --head` they all join, student i on server
    i mod servers; the server CPU figures are then the first server's)."""
    from playwright.async_api import async_playwright

    from peftcore import TASKS
    if servers > 1 and executor != "ray":
        raise ValueError("several web servers share one run service only on Ray (executor='ray')")
    students = [Student(i, seed=i + 1 if distinct else None) for i in range(n)]
    result = ClassResult(n, race, distinct, steps or default_steps(race), next(iter(TASKS)), students,
                         executor=executor, servers=servers)
    t0 = time.time()
    before = set(_below(os.getpid()))  # what this process ran before (a test's shared server, its browser)
    with contextlib.ExitStack() as stack:
        # every simulated student is on this machine: one loopback address, which a room does not share
        env, head = {"PEFT_MAX_PER_ADDRESS": "0"}, None
        if servers > 1:  # the lecture hall: one Ray, every web server joins its one run service
            head = stack.enter_context(ray_head())
            env.update(RAY_ADDRESS=head.address)  # and its token: ray_head puts it in this environment
        every = [stack.enter_context(streamlit_server(timeout=server_timeout, flags=flags, thread_probe=True,
                                                      executor=executor, env=env)) for _ in range(servers)]
        server = every[0]
        not_browsers = {sv.pid for sv in every} | ({head.pid} if head else set()) | before
        result.phases["server start"] = time.time() - t0
        async with async_playwright() as pw:
            renice_below(os.getpid(), not_browsers)  # Playwright's driver: the browser it starts inherits its priority
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            # the students' browsers run on their own laptops in a class: here they take the
            # lowest CPU priority (chromium and Playwright's driver; a page's processes inherit it)
            renice_below(os.getpid(), not_browsers)
            try:
                gate = asyncio.Semaphore(load_at_once)
                probe = await StorageProbe.open(browser, server.url, result.foreign) if storage else None
                sessions = await script_sessions(server) if storage else set()  # the storage page's only
                pages = await asyncio.gather(*(open_student(browser, every[s.index % servers].url, s, race, steps,
                                                            device, gate, result.foreign) for s in students))
                renice_below(os.getpid(), not_browsers)  # the pages opened since launch too
                result.phases["seating"] = time.time() - t0 - result.phases["server start"]
                if probe:  # the CPU of one storage rerun with nothing else running
                    _, total0, _, script0, _ = cpu_sample(server, sessions)
                    idle_from = time.time()
                    k = await probe.moves(n=IDLE_MOVES)
                    await asyncio.sleep(0.5)  # its last script thread exits and logs its CPU
                    _, total1, _, script1, _ = cpu_sample(server, sessions)
                    result.storage_cpu_each = (total1 - total0) / k
                    result.storage_script_cpu_each = (script1 - script0) / k
                    result.storage_idle_s = script_walls(server, sessions, idle_from, time.time())
                    result.storage_idle_client_s = await probe.script_seconds()
                go, stop = asyncio.Event(), asyncio.Event()
                deadline = time.time() + timeout
                watchers = [press_and_watch(p, s, go, deadline) for p, s in zip(pages, students)]
                threads0, browser0 = server.thread_cpu(), descendants_cpu(os.getpid(), not_browsers)
                busy0, ours0 = machine_busy(), own_cpu()
                sampler = asyncio.ensure_future(sample_cpu(server, stop, sessions))
                await asyncio.sleep(0)  # its first sample: before the clicks
                go.set()
                storage_task = asyncio.ensure_future(probe.moves(stop=stop)) if probe else None
                t1 = time.time()
                await asyncio.gather(*watchers)
                result.phases["class"] = time.time() - t1
                stop.set()
                result.cpu = await sampler
                result.by_thread = cpu_by_thread(threads0, server.thread_cpu())
                result.browser_cpu = descendants_cpu(os.getpid(), not_browsers) - browser0
                result.other_cpu = (machine_busy() - busy0) - (own_cpu() - ours0)
                if storage_task:
                    await storage_task
                    result.storage_moved, result.storage_quiet = probe.moved[IDLE_MOVES:], probe.quiet
                    await asyncio.sleep(0.5)  # its last script thread exits and logs
                    result.storage_script_s = script_walls(server, sessions, t1, time.time())
                    result.storage_client_s = await probe.script_seconds()
            finally:
                await browser.close()
        log = re.sub(r"\x1b\[[0-9;]*m", "", "".join(sv.log_text() for sv in every))  # no colours
        result.server_errors = [line.strip() for line in log.splitlines() if re.search(r"Traceback|Error\b", line)][:10]
    return result


def run_async(coro_fn, *args, **kwargs):
    """asyncio.run in a thread of its own: works beside a sync Playwright (pytest's browser
    fixture), whose event loop owns the calling thread."""
    out = {}

    def target():
        try:
            out["value"] = asyncio.run(coro_fn(*args, **kwargs))
        except BaseException as e:  # re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=target, name="classroom")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def classroom(n, **kwargs):
    """The class, synchronously: see run_class."""
    return run_async(run_class, n, **kwargs)


# ------------------------------------------------------------------ the core alone
def default_steps(race=False):
    """Where the train page's Steps slider starts: the LoRA preset's budget, in either mode
    (the race's slider starts there too)."""
    from peftcore.presets import PRESETS
    return PRESETS["LORA"].train["steps"]


def core_jobs(n, race=False, distinct=False, steps=None, device=None):
    """(label, config, seed, train kwargs) of every distinct run the class starts (identical
    runs are one computation), as the train page starts them: the preset's config and
    budget, steps and seed as set, the app's eval_every (ui.eval_every), and "Stop when
    solved" as the page's default (on)."""
    from peftcore.presets import PRESETS
    from peftcore.train import resolve_device
    steps, device = steps or default_steps(race), device or resolve_device("auto")
    methods = list(PRESETS) if race else ["LORA"]
    jobs = []
    for i in range(n if distinct else 1):
        seed = i + 1 if distinct else 0
        for m in methods:
            kw = dict(PRESETS[m].train, steps=steps, seed=seed, device=device, stop_when_solved=True,
                      eval_every=max(5, min(25, steps // 10)))  # as ui.eval_every
            jobs.append((m, PRESETS[m].config, seed, kw))
    return jobs


def core_alone(jobs, task):
    """Train every job at once in its own thread (one torch thread each, as the server):
    {"first": s, "last": s, "steps_per_s": [...]} from the start of all to each end."""
    import torch

    import peftcore
    from peftcore.train import warm_up
    torch.set_num_threads(1)
    base = peftcore.load_base(device=jobs[0][3]["device"])
    warm_up(base, jobs[0][3]["device"])  # as the server does at its start
    models = [(peftcore.get_peft_model(base, config, seed=seed), kw) for _, config, seed, kw in jobs]
    ends, rates = [None] * len(models), [None] * len(models)
    start = threading.Barrier(len(models) + 1)

    def work(i, model, kw):
        start.wait()
        t0 = time.perf_counter()
        last = peftcore.run(model, task, **kw)
        ends[i] = time.perf_counter()
        rates[i] = last.step / (ends[i] - t0)

    threads = [threading.Thread(target=work, args=(i, m, kw)) for i, (m, kw) in enumerate(models)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return dict(first=min(ends) - t0, last=max(ends) - t0, steps_per_s=rates)


# ------------------------------------------------------------------ the table
HEADER = ("| N | mode | results | click->first curve p50 / max s | click->result p50 / max s | steps/s seen "
          "| live updates/s min | max gap s | exceptions | in line seen / waited | server CPU s train / other "
          "| page CPU ms per live update: all / scripts | storage rerun p50 / p95 ms | core alone s | ratio |\n"
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def ms(values, q, spec=".0f"):
    return fmt(pct([1000 * v for v in values], q), spec)


def row(r: ClassResult):
    firsts = [s.to_first_curve for s in r.students if s.to_first_curve is not None]
    done = [s.to_result for s in r.results]
    rates = [x for s in r.students for x in s.steps_per_s]
    live = [s.live_rate for s in r.students if s.live_rate is not None]
    gaps = [s.max_gap for s in r.students if s.max_gap is not None]
    waited = [s for s in r.students if s.saw_queue]
    mode = (("race" if r.race else "one method") + (", distinct seeds" if r.distinct else "") + f", {r.steps} steps"
            + f", {'Ray' if r.executor == 'ray' else 'in-process'}" + (f", {r.servers} servers" if r.servers > 1 else ""))
    whole = r.whole or dict(server=0.0, training=0.0)
    core = r.core["last"] if r.core else None
    ratio = max(done) / core if done and core and len(done) == r.n else None
    page, scripts = r.per_update("page"), r.per_update("scripts")
    return (f"| {r.n} | {mode} | {len(done)} / {r.n} | {fmt(pct(firsts, .5))} / {fmt(max(firsts, default=None))} "
            f"| {fmt(pct(done, .5))} / {fmt(max(done, default=None))} "
            f"| {fmt(statistics.median(rates) if rates else None)} "
            f"| {fmt(min(live, default=None), '.2f')} | {fmt(max(gaps, default=None))} "
            f"| {r.exceptions} | {sum(bool(s.log.get('inLine')) for s in waited)} / {len(waited)} "
            f"| {whole['training']:.1f} / {whole['server'] - whole['training']:.1f} "
            f"| {fmt(page and 1000 * page)} / {fmt(scripts and 1000 * scripts)} "
            f"| {ms(r.storage_script_s, .5)} / {ms(r.storage_script_s, .95)} | {fmt(core)} | {fmt(ratio, '.2f')} |")


def details(r: ClassResult, students=True):
    keys = [dt for _, dt in r.storage_moved]
    whole = r.whole
    lines = [f"\nN = {r.n}: storage page alone: script p50 {ms(r.storage_idle_s, .5)} ms in the server "
             f"({ms(r.storage_idle_client_s, .5)} ms as the page saw it), server CPU per rerun "
             f"{1000 * r.storage_cpu_each:.0f} ms ({1000 * r.storage_script_cpu_each:.0f} ms in its script thread; "
             f"{len(r.storage_idle_s)} reruns). "
             f"While the class trained: {len(keys)} reruns, script p50 / p95 as the page saw it "
             f"{ms(r.storage_client_s, .5)} / {ms(r.storage_client_s, .95)} ms, key -> redrawn headline "
             f"{ms(keys, .5)} / {ms(keys, .95)} ms."]
    if whole:
        lines.append(f"server CPU over the class (click -> last result): {whole['server']:.1f} s: training "
                     f"{whole['training']:.1f} s, the students' script runs {whole['scripts']:.1f} s, the storage "
                     f"page's {whole['storage']:.1f} s, the rest (event loop...) "
                     f"{whole['server'] - whole['training'] - whole['scripts'] - whole['storage']:.1f} s; "
                     f"{whole['updates']} live updates seen")
    lp = r.live_panels
    if lp and lp["updates"]:
        lines.append(f"live panels only (first step -> first result): the students' script runs {lp['scripts']:.2f} s "
                     f"over {lp['updates']} live updates = {1000 * lp['scripts'] / lp['updates']:.1f} ms each; "
                     f"in the {lp['quiet_s']:.0f} s of it without a storage rerun, all but training "
                     f"{lp['page']:.2f} s over {lp['page_updates']} live updates"
                     + (f" = {1000 * lp['page'] / lp['page_updates']:.1f} ms each" if lp["page_updates"] else ""))
    if r.core:
        lines.append(f"core alone ({len(r.core['steps_per_s'])} runs at once): first done {r.core['first']:.1f} s, "
                     f"last {r.core['last']:.1f} s, steps/s per run p50 {statistics.median(r.core['steps_per_s']):.1f}")
    lines.append("server CPU by thread over the class: " + ", ".join(
        f"{name} {cpu:.2f} s" for name, cpu in r.by_thread.items() if cpu >= 0.01))
    if r.phases.get("class"):
        lines.append(f"the browsers (chromium, {r.n + 1} pages, and Playwright's driver) used {r.browser_cpu:.1f} s "
                     f"of CPU over the class: {100 * r.browser_cpu / r.phases['class'] / os.cpu_count():.0f}% "
                     f"of this machine's {os.cpu_count()} cores, beside the server; other processes "
                     f"(not this benchmark's) {r.other_cpu:.1f} s = {100 * r.other_cpu / r.phases['class'] / os.cpu_count():.0f}%")
    lines.append("time spent: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.phases.items()))
    for s in r.students if students else []:
        lines.append(f"  student {s.index}{'' if s.seed is None else f' (seed {s.seed})'}: first curve "
                     f"{fmt(s.to_first_curve)} s, result {fmt(s.to_result)} s, steps/s {s.steps_per_s}, "
                     f"live {fmt(s.live_rate, '.2f')}/s (max gap {fmt(s.max_gap)} s), "
                     f"{len(s.updates())} updates, in line: {s.log.get('inLineText') or '-'}"
                     + (f", ERROR {s.error}" if s.error else ""))
    for e in sorted(set(r.errors)):
        lines.append(f"  error shown: {e}")
    for e in r.server_errors:
        lines.append(f"  server log: {e}")
    for u in sorted(set(r.foreign))[:5]:
        lines.append(f"  request to another host: {u}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, nargs="+", help="students (each N on a fresh server)")
    ap.add_argument("--race", action="store_true", help="Mode: Race (every method) before Train")
    ap.add_argument("--distinct-seeds", action="store_true", help="student i sets Seed i+1 (no shared runs)")
    ap.add_argument("--steps", type=int, help="each student moves the Steps slider here (10-1000, by 10)")
    ap.add_argument("--device", help="each student picks this Device in the sidebar (default: the app's)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds from the click to the last result")
    ap.add_argument("--no-core", action="store_true", help="skip the core-alone runs")
    ap.add_argument("--no-storage", action="store_true", help="skip the storage page session")
    ap.add_argument("--server-flags", default="",
                    help='extra `streamlit run` flags, e.g. --server-flags="--runner.postScriptGC true"')
    ap.add_argument("--executor", choices=["inprocess", "ray"], default="inprocess",
                    help="where the server trains: its own threads, or Ray worker processes (one per core; "
                         "pip install -r requirements-ray.txt)")
    ap.add_argument("--servers", type=int, default=1,
                    help="web servers the students are split across (student i on server i mod K); more than one "
                         "needs --executor ray: they join one `ray start --head` and share its run service")
    ap.add_argument("--details", action="store_true", help="a line per student under the table")
    ap.add_argument("--json", metavar="PATH", help="also write every measurement (each page's log) to PATH")
    args = ap.parse_args()
    if args.servers > 1 and args.executor != "ray":
        ap.error("--servers > 1 needs --executor ray (the servers share Ray's one run service)")
    if args.steps is not None and not (10 <= args.steps <= 1000 and args.steps % 10 == 0):
        ap.error("--steps: 10 to 1000, a multiple of 10")

    from bench.common import machine  # one torch thread, as the server
    results = []
    for n in args.n:
        r = classroom(n, race=args.race, distinct=args.distinct_seeds, steps=args.steps, device=args.device,
                      timeout=args.timeout, storage=not args.no_storage, flags=shlex.split(args.server_flags),
                      executor=args.executor, servers=args.servers)
        if not args.no_core:
            r.core = core_alone(core_jobs(n, args.race, args.distinct_seeds, args.steps, args.device), r.task)
        results.append(r)
        print(f"N = {n} done: {len(r.results)} / {n} results", flush=True)
    print(f"\n`python -m bench.classroom {' '.join(sys.argv[1:])}`\n\nmachine: {machine()}\n")
    print(HEADER)
    for r in results:
        print(row(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1, default=str)
    for r in results:
        print(details(r, students=args.details or bool(r.errors) or len(r.results) < r.n))


if __name__ == "__main__":
    main()
