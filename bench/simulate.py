"""A class of simulated students: N of them press Train at once, over Streamlit's own websocket.

    python -m bench.simulate N [N ...] [--servers K] [--distinct] [--steps S] [--no-proxy]
                             [--repeat R] [--timeout T] [--details] [--json PATH]

No browser per student: each student is a websocket to `/_stcore/stream` speaking the
protocol the Streamlit frontend speaks (protobuf BackMsg up, ForwardMsg down; see "The
protocol" below), so one process carries hundreds of them. Against real `streamlit run`
servers (harness.servers): K of them (--servers, default 1) on one fresh `ray start --head`
(harness.servers.ray_head, token auth; the web servers train nothing themselves, the run
service on Ray does), behind a real sticky reverse proxy (harness.proxy: Debian's haproxy,
cookie-sticky, X-Forwarded-For set to the peer, compressing, static files cached: the README's
lecture-hall proxy) unless --no-proxy (student i then opens server i mod K directly).

The flow, per student, as bench.classroom's real browsers do it: open /train (through the
proxy: a GET of the page first, which gives the proxy's sticky cookie, then the websocket
with it), wait for the script run to end, set the sidebar's Seed to i+1 (--distinct) and
the Steps slider (--steps) as a browser's widgets would, then wait at a barrier; all press
Train at the same moment and watch the live panel (its fragment reruns, sent by the
student on the fragment's run_every timer, as the frontend does) until the "Results on
<task>" heading has been drawn by a finished script run.

Per class (a row; with --repeat R, R fresh classes and a median row):
  results          students whose page drew "Results on ..." / N
  exceptions       `exception` elements (Streamlit's Exception proto) any page received;
                   st.error texts and protocol faults are listed under the table
  in line          waiting students (a progress line said queued or waiting) that were shown
                   their place ("waiting: number K in line") / waiting students, and the
                   first places shown (lowest-highest)
  live updates/s   per running student (one shown a step > 0): changes of its progress
                   text from the first step shown to the result, (count - 1) / span, as
                   bench.classroom counts them in the page; min and median; max gap s
  CPU / update     the web servers' CPU (utime + stime of each `streamlit run` process, every
                   thread, /proc) per live update the students received: while only live
                   panels run (first step any student saw -> first result, when that lasts
                   3 s or more), and over the whole class (press -> last result card: the
                   presses, the live panels, the result cards); per script run: the whole
                   class's CPU over the fragment and full runs the students caused
  CPU / session    the web servers' CPU from the press to the end of the last result card's
                   script run, over N
  MB / session     the web servers' RSS growth from before seating (after one warm-up page
                   per server) to the end of the class, over N
  training         Ray's Worker processes' CPU from the press to the last result card, over
                   (wall x this machine's CPUs): the training capacity the class used
  press -> result  first and last result ("Results on" arrived), seconds after the common
                   press; in brackets, when the last result card's script run ended
  alone / ratio    the same distinct runs in this process with peftcore alone, all at once,
                   one torch thread each (bench.classroom.core_alone), after the class;
                   ratio = last result / that (skipped above 32 distinct runs)

The protocol a simulated tab speaks, and what it does not simulate: harness/student.py.
"""
import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from streamlit.proto.Alert_pb2 import Alert

from bench.common import LiveUpdates, fmt, pct
from harness.proxy import COOKIE as PROXY_COOKIE
from harness.servers import CLK_TCK, proc_cpu_seconds, ray_head, streamlit_server
from harness.student import FRAGMENT_RUN, FULL_RUN, Page

# ------------------------------------------------------------------ what the train page shows
PAGE = "train"
TRAIN_KEY = "train_go"                    # the Train button's user key
SEED_KEY = "seed"                         # the sidebar's Seed number_input
STEPS_KEY_PREFIX = "steps-"               # the one-method Steps slider: key "steps-<method>"
RESULTS = "Results on"                    # the heading above the result cards
STEP_RE = re.compile(r"\bstep (\d+)/(\d+)")
PLACE_RE = re.compile(r"number (\d+) in line")
WAITING_RE = re.compile(r"\b(queued|waiting)\b")
ACTIVE_RE = re.compile(r"· (queued|running) ·|waiting: number")
ALERT_ERROR = Alert.ERROR                 # an st.error box
RAY_WORKER = b"ray::Worker"               # the process title of a training worker (peftcore.service.ray_executor.Worker)


# ------------------------------------------------------------------ one student's observations
@dataclass
class Student(LiveUpdates):
    index: int
    seed: int = None          # set in the sidebar (--distinct), else the app's default
    server: str = ""          # the web server it landed on
    seated: float = None      # epoch s: its page ran and its widgets are set
    pressed: float = None     # epoch s, just before the Train press went out
    result_at: float = None   # epoch s: "Results on ..." arrived
    done_at: float = None     # epoch s: the run that drew it finished
    result_text: str = ""
    progress: list = field(default_factory=list)   # [epoch s, text, from a fragment run], each change
    places: list = field(default_factory=list)     # places in line shown, in order
    exceptions: list = field(default_factory=list)  # "type: message" of each exception element
    errors: list = field(default_factory=list)     # st.error texts (distinct)
    fragment_runs: list = field(default_factory=list)  # epoch s each fragment run ended, after the press
    full_runs: int = 0        # full script runs ended after the press
    runs: str = ""            # the page's run ids, from its query string (train=...)
    messages: int = 0         # ForwardMsgs received
    received: int = 0         # bytes received
    cache_hits: int = 0       # ref_hash messages resolved from this client's cache
    deltas: int = 0           # elements received after the press
    error: str = ""           # what went wrong on our side (a timeout, a closed websocket...)

    # what one script run showed: its progress lines, joined, at its end
    _lines: list = field(default_factory=list, repr=False)
    _line_t: float = None

    def run_started(self):
        self._lines, self._line_t = [], None

    def element(self, now, kind, el):
        if self.pressed:
            self.deltas += 1
        if kind == "progress":
            self._lines.append(el.text)
            self._line_t = self._line_t or now
            for place in PLACE_RE.findall(el.text):
                if self.pressed:
                    self.places.append(int(place))
        elif kind == "heading":
            if self.result_at is None and el.body.startswith(RESULTS) and self.pressed:
                self.result_at, self.result_text = now, el.body
        elif kind == "exception":
            self.exceptions.append(f"{el.type}: {el.message}"[:300])
        elif kind == "alert" and el.format == ALERT_ERROR:
            text = el.body.strip()[:300]
            if text not in self.errors:
                self.errors.append(text)

    def run_ended(self, now, status, fragment):
        if self._lines and self.pressed:
            text = " | ".join(self._lines)
            if not self.progress or self.progress[-1][1] != text:
                self.progress.append([self._line_t or now, text, fragment])
        self._lines, self._line_t = [], None
        if self.pressed:
            if status == FRAGMENT_RUN:
                self.fragment_runs.append(now)
            elif status == FULL_RUN:
                self.full_runs += 1
                if self.result_at and self.done_at is None:
                    self.done_at = now

    # -------------------------------------------------------------- figures
    @property
    def first_step(self):
        for t, text, _ in self.progress:
            if any(int(s) > 0 for s, _ in STEP_RE.findall(text)):
                return t
        return None

    @property
    def to_result(self):
        return self.result_at - self.pressed if self.result_at and self.pressed else None

    def updates(self, start=None, end=None):
        return [t for t, _, _ in self.progress if (start is None or t >= start) and (end is None or t <= end)]

    @property
    def waited(self):
        """Whether its run was shown waiting (queued, or a place in line)."""
        return bool(self.places) or any(WAITING_RE.search(text) for _, text, _ in self.progress)

    @property
    def ran(self):
        """Whether its run was shown training (running, or a step > 0 before it ended)."""
        return any("· running ·" in text for _, text, _ in self.progress) or self.first_step is not None

    @property
    def live_while_active(self):
        """Progress changes a fragment run delivered while the run was active (waiting or
        training): the live panel's updates, not the full runs' redraws."""
        return sum(1 for _, text, fragment in self.progress if fragment and ACTIVE_RE.search(text))


# ------------------------------------------------------------------ measuring processes
def rss_bytes(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_table():
    """{pid: (parent pid, own CPU s, CPU s of its reaped children)} of every process, one pass over /proc."""
    table = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            table[int(pid)] = (int(f[1]), (int(f[11]) + int(f[12])) / CLK_TCK, (int(f[13]) + int(f[14])) / CLK_TCK)
    return table


def tree_cpu(table, root):
    """CPU s of `root` and every process below it, with their reaped children's."""
    if not root or root not in table:
        return 0.0
    total = 0.0
    for pid, (_, cpu, reaped) in table.items():
        p = pid
        while p != root and p in table and p > 1:
            p = table[p][0]
        if p == root:
            total += cpu + reaped
    return total


def own(table, pid):
    """CPU s of the process `pid` itself: every thread (a web server's event loop, script
    runs, its Ray driver), as bench.classroom counts a server; not a local Ray it started."""
    return table[pid][1] if pid in table else 0.0


def ray_worker_pids():
    """The processes titled ray::Worker (peftcore.service.ray_executor's training workers)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(RAY_WORKER):
                    out.append(int(pid))
            except OSError:
                continue
    return out


@dataclass
class Sample:
    t: float
    servers: list      # CPU s per web server process
    rss: list          # bytes per web server
    workers: dict      # Ray Worker pid -> CPU s
    proxy: float       # haproxy's CPU s
    ours: float        # this process's CPU s
    busy: float        # the machine's busy CPU s (every core, every process)


def sample(servers, proxy_pid, worker_pids=None):
    from bench.classroom import machine_busy
    table = proc_table()
    pids = ray_worker_pids() if worker_pids is None else worker_pids
    workers = {p: table[p][1] for p in pids if p in table}
    return Sample(time.time(), [own(table, s.pid) for s in servers], [rss_bytes(s.pid) for s in servers], workers,
                  tree_cpu(table, proxy_pid), proc_cpu_seconds("/proc/self/stat"), machine_busy())


async def sampler(servers, proxy_pid, stop, every=0.5):
    """Samples every `every` s until `stop` is set (the Ray workers listed anew every 5 s)."""
    out, pids, listed = [], None, 0.0
    while True:
        now = time.time()
        if now - listed > 5:
            pids, listed = None, now
        s = sample(servers, proxy_pid, pids)
        pids = list(s.workers)
        out.append(s)
        if stop.is_set():
            return out
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def at(samples, t, get):
    """get(sample) at epoch `t`, interpolated between samples."""
    for a, b in zip(samples, samples[1:]):
        if a.t <= t <= b.t:
            w = (t - a.t) / (b.t - a.t) if b.t > a.t else 0.0
            return get(a) + w * (get(b) - get(a))
    return get(samples[0] if t < samples[0].t else samples[-1])


def workers_between(a, b):
    """Ray Worker CPU s from sample a to sample b (a worker started meanwhile counts from 0)."""
    return sum(cpu - a.workers.get(pid, 0.0) for pid, cpu in b.workers.items())


# ------------------------------------------------------------------ the class
@dataclass
class ClassResult:
    n: int
    servers: int
    distinct: bool
    steps: int
    proxy: bool
    students: list
    samples: list = field(default_factory=list)   # from the press to the end of the class
    before: Sample = None     # after the warm-up pages, before seating
    seated: Sample = None     # after seating, before the press
    go: float = None          # epoch s of the press
    phases: dict = field(default_factory=dict)
    by_server: dict = field(default_factory=dict)  # server URL -> students
    server_errors: list = field(default_factory=list)
    core: dict = None
    by_thread: dict = field(default_factory=dict)  # the web servers' CPU s over the class by thread name
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def results(self):
        return [s for s in self.students if s.result_at]

    @property
    def exceptions(self):
        return sum(len(s.exceptions) for s in self.students)

    @property
    def last(self):
        ends = [s.result_at for s in self.results]
        return max(ends) if ends else None

    def window(self):
        """(start, end) while only live panels run: the first step any student saw -> the
        first result; the whole class if that holds under two samples."""
        firsts = [s.first_step for s in self.students if s.first_step]
        ends = [s.result_at for s in self.students if s.result_at]
        end_all = self.samples[-1].t if self.samples else time.time()
        if firsts and ends and min(firsts) < min(ends) and sum(min(firsts) <= x.t <= min(ends) for x in self.samples) >= 2:
            return min(firsts), min(ends)
        return self.go, self.last or end_all

    def server_cpu(self, start, end):
        return sum(at(self.samples, end, lambda x, i=i: x.servers[i]) - at(self.samples, start, lambda x, i=i: x.servers[i])
                   for i in range(len(self.samples[0].servers)))

    @property
    def per_update(self):
        """Server CPU s per live update while only live panels run (the window; None when it
        is under 3 s: a class of short distinct runs has no such stretch), and over the whole
        class (press -> last result: the presses, the live panels and the result cards), with
        the whole class's CPU per script run (fragment and full runs the students caused)."""
        if not self.samples:
            return None
        start, end = self.window()
        cpu = self.server_cpu(start, end)
        updates = sum(len(s.updates(start, end)) for s in self.students)
        steady = cpu / updates if updates and end - start >= 3.0 else None
        a, b = self.class_span
        whole_cpu = self.server_cpu(a, b)
        whole_updates = sum(len(s.updates(a, b)) for s in self.students)
        runs = sum(s.full_runs + len(s.fragment_runs) for s in self.students)
        return dict(steady=steady, whole=whole_cpu / whole_updates if whole_updates else None,
                    per_run=whole_cpu / runs if runs else None, window=end - start, window_cpu=cpu,
                    window_updates=updates, updates=whole_updates, runs=runs, cpu=whole_cpu)

    @property
    def class_span(self):
        """(press, the end of the last script run that drew a result card): the whole class,
        the result cards' own work included (it follows the heading in the same run)."""
        if not self.samples:
            return None
        ends = [s.done_at for s in self.students if s.done_at]
        return self.go, max(ends) if ends else self.samples[-1].t

    @property
    def cpu_per_session(self):
        if not self.samples:
            return None
        start, end = self.class_span
        return self.server_cpu(start, end) / self.n

    @property
    def mb_per_session(self):
        if not (self.before and self.samples):
            return None
        return (sum(self.samples[-1].rss) - sum(self.before.rss)) / self.n / 2 ** 20

    @property
    def training_used(self):
        """Ray Workers' CPU over (wall x CPUs), press -> last result."""
        if not self.samples or not self.last:
            return None
        first = self.samples[0]
        last = min(self.samples, key=lambda x: abs(x.t - self.class_span[1]))
        wall = last.t - first.t
        return workers_between(first, last) / (wall * self.cpus) if wall > 0 else None

    def others(self):
        """CPU s over the class: proxy, this simulator, the whole machine."""
        a, b = self.samples[0], self.samples[-1]
        return dict(proxy=b.proxy - a.proxy, ours=b.ours - a.ours, busy=b.busy - a.busy,
                    servers=sum(b.servers) - sum(a.servers), workers=workers_between(a, b), wall=b.t - a.t)


async def seat(student, base, steps, gate, timeout):
    async with gate:
        page = Page(base, PAGE, student)
        try:
            await page.open(timeout)
            if student.seed is not None:
                await page.set_value(SEED_KEY, double_value=float(student.seed), timeout=timeout)
            if steps is not None:
                await page.set_value(page.key_starting(STEPS_KEY_PREFIX), timeout=timeout,
                                     double_array_value={"data": [float(steps)]})
            student.seated = time.time()
        except Exception as e:
            student.error = f"seating: {type(e).__name__}: {e}"
        return page


async def press_and_watch(page, student, go, deadline):
    await go.wait()
    if student.error:
        return
    student.pressed = time.time()
    try:
        await page.press(TRAIN_KEY)
        # the run that drew the result cards has ended (an exception in them counts too)
        await page.wait_until(lambda: student.done_at is not None, max(1.0, deadline - time.monotonic()))
    except Exception as e:
        student.error = f"{type(e).__name__}: {e}"


async def warm_up(servers, timeout):
    """One page per server, closed again: each server's first script run (base, Ray
    connection, the run service) is paid before the class and its memory counted."""
    for sv in servers:
        page = Page(sv.url, PAGE, Student(-1))
        try:
            await page.open(timeout)
        finally:
            await page.close()


async def report(result, stop, every=15):
    while not stop.is_set():
        await asyncio.sleep(every)
        s = result.students
        say(f"{time.time() - result.go:.0f} s after the press: {len(result.results)} results, "
            f"{sum(x.ran for x in s)} shown training, {sum(x.waited for x in s)} shown waiting, "
            f"{sum(bool(x.error) for x in s)} errors")


def say(text):
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[simulate {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def run_class_async(result, servers, proxy, steps, timeout, load_at_once, seat_timeout):
    t0 = time.time()
    say(f"warming up {len(servers)} server(s)")
    await warm_up(servers, seat_timeout)
    await asyncio.sleep(1.0)  # the warm-up sessions' disconnects settle
    result.phases["warm-up"] = time.time() - t0
    result.before = sample(servers, proxy and proxy.pid)
    gate = asyncio.Semaphore(load_at_once)
    bases = [proxy.url if proxy else servers[s.index % len(servers)].url for s in result.students]
    pages = await asyncio.gather(*(seat(s, b, steps, gate, seat_timeout) for s, b in zip(result.students, bases)))
    for page, s in zip(pages, result.students):
        s.server = (proxy.server_of(page.cookies.get(PROXY_COOKIE)) if proxy else page.base) or "?"
        result.by_server[s.server] = result.by_server.get(s.server, 0) + 1
    result.phases["seating"] = time.time() - t0 - result.phases["warm-up"]
    result.seated = sample(servers, proxy and proxy.pid)
    say(f"{sum(s.seated is not None for s in result.students)} of {result.n} seated in {result.phases['seating']:.0f} s; "
        "pressing Train")
    try:
        go, stop = asyncio.Event(), asyncio.Event()
        deadline = time.monotonic() + timeout
        watchers = [asyncio.ensure_future(press_and_watch(p, s, go, deadline)) for p, s in zip(pages, result.students)]
        threads0 = [sv.thread_cpu() for sv in servers]
        sampling = asyncio.ensure_future(sampler(servers, proxy and proxy.pid, stop))
        await asyncio.sleep(0.1)  # its first sample: before the press
        result.go = time.time()
        go.set()
        reporter = asyncio.ensure_future(report(result, stop))
        await asyncio.gather(*watchers)
        reporter.cancel()
        result.phases["class"] = time.time() - result.go
        stop.set()
        result.samples = await sampling
        await asyncio.sleep(0.5)  # the last script threads exit and log their CPU
        from bench.classroom import cpu_by_thread
        for before, sv in zip(threads0, servers):
            for name, cpu in cpu_by_thread(before, sv.thread_cpu()).items():
                result.by_thread[name] = result.by_thread.get(name, 0.0) + cpu
    finally:
        await asyncio.gather(*(p.close() for p in pages), return_exceptions=True)


def run_class(n, servers=1, distinct=False, steps=None, proxy=True, timeout=900, load_at_once=8,
              server_timeout=180, seat_timeout=300):
    """Start a Ray head, `servers` web servers on it and (proxy=True) haproxy in front;
    seat n simulated students, press Train together, measure; a ClassResult."""
    from harness.proxy import haproxy  # needs only /usr/sbin/haproxy when proxy=True
    students = [Student(i, seed=i + 1 if distinct else None) for i in range(n)]
    result = ClassResult(n, servers, distinct, steps or default_steps(), proxy, students)
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        say(f"class of {n}: starting Ray, {servers} web server(s)")
        head = stack.enter_context(ray_head())
        # every simulated student comes from 127.0.0.1: one address, which a room does not share
        env = {"RAY_ADDRESS": head.address, "PEFT_MAX_PER_ADDRESS": "0"}
        # thread_probe: per-thread CPU (script runs, event loop, static files), as bench.classroom
        every = [stack.enter_context(streamlit_server(timeout=server_timeout, env=env, executor="ray", thread_probe=True))
                 for _ in range(servers)]
        px = stack.enter_context(haproxy([sv.url for sv in every], static=True)) if proxy else None
        result.phases["start"] = time.time() - t0
        say(f"Ray head, {servers} web server(s){' and haproxy' if proxy else ''} up in {result.phases['start']:.0f} s")
        try:
            # in a thread of its own: works beside a sync Playwright whose loop owns this thread (pytest)
            from bench.classroom import run_async
            run_async(run_class_async, result, every, px, steps, timeout, load_at_once, seat_timeout)
        finally:
            log = re.sub(r"\x1b\[[0-9;]*m", "", "".join(sv.log_text() for sv in every))
            result.server_errors = [line.strip() for line in log.splitlines()
                                    if re.search(r"Traceback|Error\b|Exception\b", line)][:10]
    return result


def default_steps():
    from peftcore.presets import PRESETS
    return PRESETS["LORA"].train["steps"]


def core_alone(n, distinct, steps):
    """The same runs in this process with peftcore alone (bench.classroom.core_alone)."""
    from bench.classroom import core_alone as alone, core_jobs
    from peftcore import TASKS
    return alone(core_jobs(n, False, distinct, steps), next(iter(TASKS)))


# ------------------------------------------------------------------ the table
HEADER = ("| N | servers | mode | results | exceptions | in line seen / waited (places) | live updates/s min / p50 "
          "| max gap s | server CPU ms per live update: live panels / whole class | per script run ms "
          "| server CPU s per session "
          "| MB per session | training used | press -> first / last result (last card drawn) s | run alone s | last / alone |\n"
          "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def figures(r: ClassResult):
    """The row's numbers, as a dict (the median row takes the median of each)."""
    live = [s.live_rate for s in r.students if s.live_rate is not None]
    gaps = [s.max_gap for s in r.students if s.max_gap is not None]
    done = [s.to_result for s in r.results]
    pu = r.per_update
    waited = [s for s in r.students if s.waited]
    places = [s.places[0] for s in waited if s.places]
    core = r.core["last"] if r.core else None
    return dict(results=len(r.results), exceptions=r.exceptions, waited=len(waited),
                saw_place=sum(bool(s.places) for s in waited), place_lo=min(places, default=None),
                place_hi=max(places, default=None), live_min=min(live, default=None), live_p50=pct(live, .5),
                max_gap=max(gaps, default=None), per_update=pu and pu["steady"], per_update_all=pu and pu["whole"],
                per_run=pu and pu["per_run"],
                per_session=r.cpu_per_session, mb=r.mb_per_session, training=r.training_used,
                first=min(done, default=None), last=max(done, default=None), core=core,
                card=r.class_span[1] - r.go if r.samples and len(r.results) == r.n else None,
                ratio=max(done) / core if done and core and len(done) == r.n else None)


def row(r: ClassResult, f=None, label=None):
    f = f or figures(r)
    mode = (label or "") + ("distinct seeds" if r.distinct else "defaults (one shared run)") + f", {r.steps} steps" \
        + ("" if r.proxy else ", no proxy")
    places = "" if f["place_lo"] is None else f" ({f['place_lo']:.0f}-{f['place_hi']:.0f})"
    return (f"| {r.n} | {r.servers} | {mode} | {fmt(f['results'], '.0f')} / {r.n} | {fmt(f['exceptions'], '.0f')} "
            f"| {fmt(f['saw_place'], '.0f')} / {fmt(f['waited'], '.0f')}{places} "
            f"| {fmt(f['live_min'], '.2f')} / {fmt(f['live_p50'], '.2f')} | {fmt(f['max_gap'])} "
            f"| {fmt(f['per_update'] and 1000 * f['per_update'])} / {fmt(f['per_update_all'] and 1000 * f['per_update_all'])} "
            f"| {fmt(f['per_run'] and 1000 * f['per_run'])} "
            f"| {fmt(f['per_session'], '.2f')} | {fmt(f['mb'], '.2f')} "
            f"| {fmt(f['training'] and 100 * f['training'], '.0f')}% "
            f"| {fmt(f['first'])} / {fmt(f['last'])} ({fmt(f['card'])}) | {fmt(f['core'])} | {fmt(f['ratio'], '.2f')} |")


def median_figures(rows):
    out = {}
    for k in rows[0]:
        values = [f[k] for f in rows if f[k] is not None]
        out[k] = statistics.median(values) if values else None
    return out


def details(r: ClassResult, students=False):
    lines = []
    pu = r.per_update
    lines.append(f"\nN = {r.n}, {r.servers} server(s), {'distinct seeds' if r.distinct else 'defaults'}, {r.steps} steps:")
    if pu:
        lines.append(f"live panels only (first step seen -> first result, {pu['window']:.1f} s): {pu['window_updates']} "
                     f"live updates, servers' CPU {pu['window_cpu']:.2f} s; whole class: {pu['updates']} live updates, "
                     f"{pu['runs']} script runs (fragment and full), servers' CPU {pu['cpu']:.1f} s; "
                     f"{sum(s.deltas for s in r.students) / max(1, pu['runs']):.1f} elements per script run")
    if r.samples:
        o = r.others()
        lines.append(f"over the class ({o['wall']:.1f} s): web servers {o['servers']:.1f} s CPU, Ray workers "
                     f"{o['workers']:.1f} s, haproxy {o['proxy']:.2f} s, this simulator {o['ours']:.1f} s "
                     f"({100 * o['ours'] / o['wall']:.0f}% of a core), the whole machine {o['busy']:.1f} s of "
                     f"{o['wall'] * r.cpus:.0f} s")
    if r.before and r.seated and r.samples:
        mb = lambda a, b: (sum(b.rss) - sum(a.rss)) / r.n / 2 ** 20  # noqa: E731
        lines.append(f"servers' RSS before seating {sum(r.before.rss) / 2 ** 20:.0f} MB; per session: seated "
                     f"{mb(r.before, r.seated):.2f} MB, after the class {mb(r.before, r.samples[-1]):.2f} MB, peak "
                     f"{(max(sum(x.rss) for x in r.samples) - sum(r.before.rss)) / r.n / 2 ** 20:.2f} MB; "
                     f"seating CPU per session {(sum(r.seated.servers) - sum(r.before.servers)) / r.n:.2f} s")
    if r.by_thread:
        lines.append("web servers' CPU by thread over the class: " + ", ".join(
            f"{name} {cpu:.2f} s" for name, cpu in sorted(r.by_thread.items(), key=lambda kv: -kv[1]) if cpu >= 0.01))
    runs = {s.runs for s in r.students if s.runs}
    msgs = sum(s.messages for s in r.students)
    lines.append(f"students per server: {', '.join(f'{u} {k}' for u, k in sorted(r.by_server.items()))}; "
                 f"distinct run sets {len(runs)}; {msgs} messages received "
                 f"({sum(s.received for s in r.students) / 2 ** 20:.1f} MB), "
                 f"{sum(s.cache_hits for s in r.students)} from the client cache")
    ran = [s for s in r.students if s.ran]
    lines.append(f"students shown their run training: {len(ran)}; of them with a live update while active (a "
                 f"fragment run's change): {sum(s.live_while_active > 0 for s in ran)}")
    if r.core:
        lines.append(f"core alone ({len(r.core['steps_per_s'])} runs at once): first done {r.core['first']:.1f} s, "
                     f"last {r.core['last']:.1f} s")
    lines.append("time spent: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.phases.items()))
    for s in r.students if students else [s for s in r.students if s.error or s.exceptions][:10]:
        lines.append(f"  student {s.index}{'' if s.seed is None else f' (seed {s.seed})'} on {s.server}: result "
                     f"{fmt(s.to_result)} s, live {fmt(s.live_rate, '.2f')}/s (max gap {fmt(s.max_gap)} s), "
                     f"{len(s.progress)} updates, {len(s.fragment_runs)} fragment runs, places {s.places[:3]}"
                     + (f", ERROR {s.error}" if s.error else "") + (f", EXCEPTIONS {s.exceptions[:2]}" if s.exceptions else ""))
    for e in sorted({e for s in r.students for e in s.errors})[:10]:
        lines.append(f"  error shown: {e}")
    for e in r.server_errors:
        lines.append(f"  server log: {e}")
    return "\n".join(lines)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # servers, Ray and haproxy are stopped on the way out


def main(argv=None):
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, nargs="+", help="students (each class on fresh servers)")
    ap.add_argument("--servers", type=int, default=1, help="web servers, 1-4 (default 1), on one Ray head")
    ap.add_argument("--distinct", action="store_true", help="student i sets Seed i+1 (no shared runs)")
    ap.add_argument("--steps", type=int, help="each student sets the Steps slider here (10-1000, by 10)")
    ap.add_argument("--no-proxy", action="store_true", help="no haproxy: student i opens server i mod K directly")
    ap.add_argument("--repeat", type=int, default=1, help="classes per N (fresh servers each); a median row")
    ap.add_argument("--timeout", type=float, default=900, help="seconds from the press to the last result")
    ap.add_argument("--load-at-once", type=int, default=8, help="students opening their page at the same time")
    ap.add_argument("--no-core", action="store_true", help="skip the core-alone runs")
    ap.add_argument("--details", action="store_true", help="a line per student under the table")
    ap.add_argument("--json", metavar="PATH", help="also write every measurement to PATH")
    args = ap.parse_args(argv)
    if not 1 <= args.servers <= 8:
        ap.error("--servers: 1 to 8")
    if args.steps is not None and not (10 <= args.steps <= 1000 and args.steps % 10 == 0):
        ap.error("--steps: 10 to 1000, a multiple of 10")

    results = []
    for n in args.n:
        group = []
        for k in range(args.repeat):
            r = run_class(n, servers=args.servers, distinct=args.distinct, steps=args.steps,
                          proxy=not args.no_proxy, timeout=args.timeout, load_at_once=args.load_at_once)
            group.append(r)
            print(f"N = {n} ({k + 1}/{args.repeat}) done: {len(r.results)} / {n} results, "
                  f"{r.exceptions} exceptions", flush=True)
        runs = n if args.distinct else 1
        if not args.no_core and runs <= 32:
            core = core_alone(n, args.distinct, group[0].steps)
            for r in group:
                r.core = core
        results.append(group)
    from bench.common import machine
    print(f"\n`python -m bench.simulate {' '.join(sys.argv[1:] if argv is None else argv)}`\n\nmachine: {machine()}\n")
    print(HEADER)
    for group in results:
        for r in group:
            print(row(r))
        if len(group) > 1:
            print(row(group[0], median_figures([figures(r) for r in group]), label="median: "))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([[dataclasses.asdict(r) for r in g] for g in results], f, indent=1, default=str)
    for group in results:
        for r in group:
            print(details(r, students=args.details))
    return results


if __name__ == "__main__":
    main()
