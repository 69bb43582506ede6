"""Runs as a page shows them: started in groups, shared, stopped, and followed live (progress lines
and curves polled by a fragment) until their result."""
import html
import math
import threading
import weakref

import streamlit as st
from streamlit.runtime import Runtime

from peftcore.service.executors import RunSpec
from peftcore.service.runs import DONE, QUEUED, QueueFull
from peftcore.tasks import EVAL_SIZE
from peftcore.train import solved_at

from .frame import method_views, panel, run_view, ss
from .charts import figure, plot
from .resources import MAX_SESSION_RUNS, base_facts, base_fingerprint, device, get_manager, run_address
from .visitor import connected, owner, sessions_of_owner


POLL_S = 0.75          # live curves refresh at least once a second (a rerun costs the GIL: not faster)...
MAX_POLL_S = 1.5       # ...or, on a server holding many pages, every 1.5 s at most (>= 0.5 updates/s)
POLL_S_PER_PAGE = 0.015  # a live-panel run costs a server 3-5 ms of CPU (BENCHMARKS.md): 100 open pages
                         # at 1.5 s take about a third of a core
WAITING_POLL_S = 2.0   # a session whose runs all wait in line: only its place changes (a class of 30
                       # polling at POLL_S cost the server ~0.6 of a core in refreshes)


def group_runs(group):
    """The runs of `group` (e.g. "train") this page shows, oldest first. Run ids are also
    kept in the URL, so a refreshed page (or a shared link) finds them again."""
    groups = ss.setdefault("groups", {})
    if group not in groups and st.query_params.get(group):
        groups[group] = st.query_params[group].split(",")[:MAX_SESSION_RUNS]
    runs = get_manager().runs
    return [runs[i] for i in groups.get(group, []) if i in runs]


def owns(run):
    return owner() in run.owners


def active_session_runs():
    return [r for g in ss.get("groups", {}) for r in group_runs(g) if not r.finished and owns(r)]


def start_group(group, jobs, task, url=False, **train_kwargs):
    """Start (or join) one run per job (label, config, extra train kwargs) as group `group`,
    replacing the group's previous runs. A job trains on the pretrained base unless its
    extra kwargs say `base="random"`. Returns an error message instead when over a limit."""
    manager, ids = get_manager(), []
    for label, config, extra in jobs:
        kwargs = {**train_kwargs, **extra}
        which, seed = kwargs.pop("base", "pretrained"), kwargs.pop("seed", 0)
        kwargs.setdefault("eval_every", eval_every(kwargs.get("steps", 300)))
        if kwargs.pop("stop_when_stuck", False):
            kwargs["patience"] = math.ceil(PATIENCE_STEPS / kwargs["eval_every"])
        spec = RunSpec(config.to_dict(), task, seed, which, base_fingerprint(which, kwargs["device"]), kwargs)
        try:
            run = manager.start(spec, label=label, owner=owner(), client=run_address())
        except QueueFull as e:
            for i in ids:  # all of the group or none of it
                manager.stop(manager.runs[i], owner())
            return str(e)
        ids.append(run.id)
    ss.setdefault("groups", {})[group] = ids
    if url:
        st.query_params[group] = ",".join(ids)
    return None


# Steps without a better held-out exact match after which a run that may stop early has stopped
# improving (train.stuck counts them in evaluations). 100: prompt tuning on a new digit map sits at
# 0% from step 25 and stops at 125 of 300; the slowest preset that solves times_3, prefix tuning,
# was at 0%, 0%, 6% at steps 25, 50, 75 and 86% at 100 (seed 0). A run of 100 steps or fewer never stops so.
PATIENCE_STEPS = 100


def stopped_improving(run, summary):
    """Whether a run (with its run_summary) ended early, unsolved, because it had stopped
    improving: its patience ran out."""
    return (run.status == DONE and summary["step"] < summary["steps"] and summary["solved_step"] is None
            and run.kwargs.get("patience") is not None)


def eval_every(steps):
    """About ten points on the accuracy curve of a short run, one per 25 steps on long ones."""
    return max(5, min(25, steps // 10))


def stop_group(group):
    """Stop this visitor's runs of `group`. A run shared with others carries on for them:
    this visitor leaves it (and it leaves the page)."""
    left = []
    for run in group_runs(group):
        if owns(run) and not get_manager().stop(run, owner()) and not run.finished:
            left.append(run.id)
    if left:
        ids = [i for i in ss["groups"][group] if i not in left]
        ss["groups"][group] = ids
        st.query_params[group] = ",".join(ids)
        ss["left_shared"] = len(left)


def stop_session_runs():
    for run in active_session_runs():
        get_manager().stop(run, owner())


@st.cache_resource
def _run_results():
    return weakref.WeakKeyDictionary(), threading.Lock()  # a run's entry goes when the manager drops it


def run_cache(run, what, compute):
    """Per-run results computed once for every session that shows the run (a class on the
    defaults shares one run: its file, fingerprint and sample outputs are computed once,
    the other sessions wait for them rather than compute them again)."""
    results, lock = _run_results()
    with lock:
        cache, run_lock = results.setdefault(run, ({}, threading.RLock()))  # re-entrant: a compute may ask another
    with run_lock:
        if what not in cache:
            cache[what] = compute()
    return cache[what]


def run_summary(run):
    """The numbers of a finished (or running) run's result card."""
    facts = base_facts(device())
    trainable = run_cache(run, "trainable", lambda: run.model.get_nb_trainable_parameters()[0])
    last, solved = run.last, solved_at(run.events)
    return dict(method=run.label, status=run.status, step=last.step if last else 0,
                steps=run.steps, trainable=trainable, phi_pct=100 * trainable / facts["params"],
                exact=last_eval(run, "eval_exact"), token=last_eval(run, "eval_token"),
                seconds=last.elapsed if last else 0.0,
                steps_per_s=last.step / last.elapsed if last and last.elapsed > 0 else 0.0,
                solved_step=solved.step if solved else None, solved_s=solved.elapsed if solved else None)


def last_eval(run, field):
    for event in reversed(run.events):
        value = getattr(event, field)
        if value is not None:
            return value
    return None


def live_runs(group):
    """Progress lines, a Stop button and overlaid loss / accuracy curves of a group's runs,
    polled every POLL_S seconds while any run is active; a full rerun once all end."""
    runs = group_runs(group)
    if ss.pop("left_shared", 0):
        st.info("You left a run shared with other visitors: it carries on for them.")
    if not runs:
        return
    polling = any(not r.finished for r in runs)
    waiting = polling and all(r.status == QUEUED for r in runs if not r.finished)

    inline = [True]  # False once this full run is over: the panel then runs on its own

    @st.fragment(run_every=poll_interval(waiting) if polling else None)
    def live_panel():
        get_manager().reap(connected)
        runs = group_runs(group)
        with panel("The live curves"):
            mine = [r for r in runs if owns(r)]
            if any(not r.finished for r in mine):
                st.button("Stop", key=f"stop-{group}", on_click=stop_group, args=(group,), type="primary",
                          help="Stops your runs of this group after their current step; phi keeps what it learned.")
            elif not mine:
                st.caption("Shared link: you are watching another visitor's runs (read-only).")
            race = len(runs) > 2  # a race: the curves first, in view under Train; a line per run below them
            if race:
                plot(live_figure(runs), curves_summary(runs), key=f"curves-{group}")
            spoken = [progress_line(run) for run in runs]
            if not race:
                plot(live_figure(runs), curves_summary(runs), key=f"curves-{group}")
            announce(spoken)
        if not inline[0] and all(r.finished for r in runs):
            # the result cards below the panel appear; polling stops. Asked on every panel run
            # of its own, even after the full run that drew the cards: a timer tick sent just
            # before that run is queued behind it, and such a page was seen without its cards
            # (8 of 30 pages on 2 cores, BENCHMARKS.md): one more full run draws them.
            st.rerun()
        if waiting and any(r.status != QUEUED for r in runs):
            st.rerun()  # its turn came: poll at the live rate from now on

    live_panel()
    inline[0] = False


def poll_interval(waiting):
    """Seconds between a live panel's refreshes on this server: POLL_S, longer as the server holds
    more open pages (at most MAX_POLL_S), so that a lecture hall's refreshes do not outgrow it:
    300 pages on 3 servers refreshing at POLL_S overloaded them until pages went a minute or more
    without an update (BENCHMARKS.md). Pages waiting in line refresh half as often, and no more
    often than every WAITING_POLL_S."""
    live = min(MAX_POLL_S, max(POLL_S, open_pages() * POLL_S_PER_PAGE))
    return max(WAITING_POLL_S, 2 * live) if waiting else live


def open_pages():
    """Pages (sessions) open on this server now (outside a server: 0; AppTest's runtime is a
    mock, whose answers are not True)."""
    if not Runtime.exists():
        return 0
    runtime = Runtime.instance()
    return sum(runtime.is_active_session(s) is True for tabs in list(sessions_of_owner().values()) for s in list(tabs))


def hidden(control):
    """Whether this visitor's exercise link hides `control` (a teacher's hide=): then no part of
    the page shows it, the live panel included."""
    return control in ss.get("exercise", {}).get("hidden", ())


def progress_line(run):
    """Draw a run's progress line; return what a screen reader hears of it (announcement)."""
    s = run_summary(run)
    exact = "-" if s["exact"] is None else f"{100 * s['exact']:.1f}%"
    others = run.other_owners(owner())  # this visitor's own other tabs are not others
    shared = f" · shared with {others} other visitor{'s' * (others > 1)}" if others else ""
    if run.status == QUEUED:
        place, wait = get_manager().place_in_line(run), get_manager().estimated_wait(run)
        if place is not None:
            text = (f"**{run.label}** · waiting: number {place} in line for a training slot"
                    + (f", about {wait:.0f} s" if wait is not None else "") + shared)
            st.progress(0.0, text=text)
            return f"{run.label}: waiting, number {place} in line."
    solved = f" · solved at step {s['solved_step']} ({s['solved_s']:.1f} s)" if s["solved_step"] else ""
    if stopped_improving(run, s):
        solved = f" · stopped improving: no better held-out exact match in its last {PATIENCE_STEPS} steps"
    budget = "" if hidden("steps") else f"/{s['steps']}"
    text = (f"**{run.label}** · {run.status} · step {s['step']}{budget} · "
            f"{s['steps_per_s']:.1f} steps/s · held-out exact match {exact}{solved}{shared}")
    st.progress(s["step"] / s["steps"] if s["steps"] else 0.0, text=text)
    if run.error:
        st.error(f"{run.label} failed: {run.error}")
    return announcement(run, s)


def curves_summary(runs):
    """The live chart in words: each run's loss from its first step to now, and its last
    held-out exact match."""
    parts = []
    for run in runs:
        events = run.events[:]
        if not events:
            parts.append(f"{run.label}: no step yet")
            continue
        exact = last_eval(run, "eval_exact")
        parts.append(f"{run.label}: training loss {events[0].loss:.3g} at step {events[0].step}, {events[-1].loss:.3g} "
                     f"at step {events[-1].step}" + ("" if exact is None else f"; held-out exact match {100 * exact:.1f}%"))
    return "Chart: training loss (top) and held-out exact match (bottom) against step. " + "; ".join(parts) + "."


def announcement(run, s):
    """What a screen reader hears of a run (s: its run_summary), coarse enough not to talk over
    its user: each quarter of its steps, its end and result (progress_line says its place in line)."""
    if run.status == QUEUED:
        return f"{run.label}: waiting."
    if run.error:
        return f"{run.label} failed."
    if run.finished:
        exact = "no evaluation" if s["exact"] is None else f"held-out exact match {100 * s['exact']:.1f}%"
        why = ", stopped improving" if stopped_improving(run, s) else ""
        return f"{run.label}: {run.status} at step {s['step']}{why}, {exact}."
    if hidden("steps") or not s["steps"]:
        return f"{run.label}: training."
    return f"{run.label}: training, {25 * int(4 * s['step'] / s['steps'])}% of its steps done."


def announce(spoken):
    """The runs' progress for a screen reader: the page frame (frame.PAGE_FRAME) reads the
    hidden data-announce text into its one polite live region whenever it changes."""
    st.html(f'<span data-announce hidden>{html.escape(" ".join(spoken))}</span>')


def live_figure(runs):
    """runs_figure, rebuilt only when a run has new events since this session's last refresh."""
    state = tuple((r.id, len(r.events), r.status) for r in runs)
    cached = ss.get("live_figure")
    if not cached or cached[0] != state:
        ss["live_figure"] = cached = (state, runs_figure(runs))
    return cached[1]


MAX_POINTS = 250  # loss points per curve: enough for the eye, small to send twice a second


def runs_figure(runs):
    """Training loss (top, log scale) and held-out exact match (bottom) against step, one
    colour per run, in one figure with one legend: readable from the back of a room."""
    traces, used = [], set()
    for run in runs:
        look = run_view(run)
        if look.color in used:  # two runs of one method (the pretraining experiment): another method's look
            look = next((v for v in method_views() if v.color not in used), look)
        used.add(look.color)
        events = run.events[:]  # a snapshot: the worker keeps appending
        evals = [e for e in events if e.eval_exact is not None]
        thin = events[::max(1, len(events) // MAX_POINTS)]
        # colour, dash and marker: each tells the runs apart on its own (colour blindness, a grey printout)
        marker = dict(symbol=look.symbol, size=11, color=look.color)
        style = dict(name=run.label, legendgroup=run.label, line=dict(width=4, color=look.color, dash=look.dash))
        traces.append(dict(type="scatter", mode="lines+markers", x=[e.step for e in thin], y=[e.loss for e in thin],
                           marker={**marker, "maxdisplayed": 8},  # in the legend; the loss curve stays a line
                           hovertemplate="step %{x}: loss %{y:.3g}", **style))
        traces.append(dict(type="scatter", mode="lines+markers", x=[e.step for e in evals],
                           y=[100 * e.eval_exact for e in evals], showlegend=False, yaxis="y2", marker=marker,
                           hovertemplate=f"step %{{x}}: %{{y:.1f}}% exact on {EVAL_SIZE} held-out", **style))
    steps = max((r.steps for r in runs), default=0)
    whole_budget = {} if hidden("steps") else dict(range=[0, steps * 1.02])  # the whole budget from the start
    # the legend wraps above the plot as runs are added (a race: six): each of its rows takes
    # height from the two panels, whose rotated titles then ran into each other; the figure grows instead
    return figure(traces, height=460 + 30 * max(0, len(runs) - 2), hovermode="closest",
                  xaxis=dict(title="step", anchor="y2", **whole_budget),
                  # plain-number log ticks from the curves' own range (log_ticks): 10, not 1e+1
                  yaxis=dict(title="training loss", type="log", domain=[0.58, 1]),
                  yaxis2=dict(title="exact match (%)", domain=[0, 0.42], range=[-3, 103]))
