"""What the pages share: the cached base and run manager, this session's bank and runs,
and chart helpers. UI glue only; the torch work lives in peftcore.

One base per device and one RunManager per server process (st.cache_resource), shared by
every session. A session's bank of phi and the ids of its runs live in st.session_state;
the runs themselves live in the manager, so a rerun or a page switch never loses one.
"""
import streamlit as st

import peftcore
from peftcore import library
from peftcore.presets import PRESETS
from peftcore.runs import RunManager
from peftcore.tasks import EVAL_SIZE

MAX_SESSION_RUNS = 4   # runs one session may have training at once
POLL_S = 0.5           # live curves refresh twice a second

# Method names as the pages show them, from HF peft's peft_type.
METHOD_OF_TYPE = {type(p.config).peft_type: name for name, p in PRESETS.items()}
METHOD_SLUG = {"LoRA": "lora", "Adapter": "adapter", "Prompt tuning": "prompt", "Full fine-tuning": "full"}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
COLORS = {"LoRA": "#1f77b4", "Adapter": "#2ca02c", "Prompt tuning": "#ff7f0e", "Full fine-tuning": "#555555"}
ss = st.session_state


# ------------------------------------------------------------------ process-wide resources
@st.cache_resource(show_spinner="Loading the frozen base...")
def get_base(device):
    """The frozen pretrained base, once per device for the whole server."""
    return peftcore.load_base(device=device)


@st.cache_resource(show_spinner="Building a random frozen base...")
def get_random_base(device):
    """The control: a randomly initialised frozen base of the same shape."""
    return peftcore.random_base(device=device)


@st.cache_resource
def get_manager():
    """One RunManager per server process: runs outlive the pages that started them."""
    return RunManager(max_concurrent=4)


@st.cache_resource
def base_facts(device):
    """Numbers about the base the pages quote: its parameters, file bytes and config."""
    base = get_base(device)
    return dict(params=sum(p.numel() for p in base.parameters()), file_bytes=peftcore.base_file_bytes(),
                config=base.config)


def available_devices():
    return sorted({"cpu", peftcore.resolve_device("auto")})


def device():
    return ss.get("device") or peftcore.resolve_device("auto")


def seed():
    return int(ss.get("seed", 0))


# ------------------------------------------------------------------ this session's bank
def bank():
    """This session's PeftModel bank over the shared base, filled with the shipped library.
    A library file that fails to load is skipped and reported, never fatal."""
    key = f"bank:{device()}"
    if key not in ss:
        model, errors = library.load_library(get_base(device()))
        ss[key], ss["library_errors"], ss["file_bytes"] = model, errors, {}
    return ss[key]


def add_to_bank(name, data):
    """Load phi file bytes into the bank; raises AdapterLoadError with the reason."""
    peftcore.load_adapter(bank(), name, data)
    ss["file_bytes"].pop(name, None)


def remove_from_bank(name):
    bank().delete_adapter(name)
    ss["file_bytes"].pop(name, None)


def file_bytes(name):
    """Measured size of phi `name` as a downloadable .safetensors file (cached)."""
    model, cache = bank(), ss["file_bytes"]
    if name not in cache:
        cache[name] = len(peftcore.adapter_to_bytes(model, name))
    return cache[name]


def bank_rows():
    """One dict per phi in the bank: method, task, parameters, phi %, file and formula bytes.
    Cached until the bank's content changes (phi in a bank never train)."""
    model, facts = bank(), base_facts(device())
    key = tuple((name, id(cfg)) for name, cfg in model.peft_config.items())
    cached = ss.get("bank_rows")
    if cached and cached[0] == key:
        return cached[1]
    memory = model.memory_bytes()["phi"]
    rows = []
    for name, cfg in model.peft_config.items():
        n, formula = model.adapter_num_params(name), cfg.num_params(facts["config"])
        rows.append(dict(name=name, method=METHOD_OF_TYPE.get(cfg.peft_type, cfg.peft_type),
                         task=model.adapter_task.get(name) or "?", params=n, phi_pct=100 * n / facts["params"],
                         formula_params=formula, formula_bytes=formula * memory[name] // max(n, 1),
                         memory_bytes=memory[name], file_bytes=file_bytes(name)))
    ss["bank_rows"] = (key, rows)
    return rows


def unique_name(stem):
    """`stem`, or `stem-2`, `stem-3`... whichever the bank does not hold yet."""
    names, i, name = bank().peft_config, 2, stem
    while name in names:
        name, i = f"{stem}-{i}", i + 1
    return name


# ------------------------------------------------------------------ runs
def group_runs(group):
    """This session's runs in `group` (e.g. "train"), oldest first. Run ids are also kept
    in the URL, so a refreshed page finds its runs again."""
    groups = ss.setdefault("groups", {})
    if group not in groups and st.query_params.get(group):
        groups[group] = st.query_params[group].split(",")
    runs = get_manager().runs
    return [runs[i] for i in groups.get(group, []) if i in runs]


def active_session_runs():
    return [r for g in ss.get("groups", {}) for r in group_runs(g) if not r.finished]


def start_group(group, jobs, task, url=False, **train_kwargs):
    """Start one run per job (label, model, extra train kwargs) as group `group`, replacing
    the group's previous runs. Returns an error message instead when over the limits."""
    busy = len(active_session_runs()) + len(jobs)
    if busy > MAX_SESSION_RUNS:
        return f"At most {MAX_SESSION_RUNS} runs per session train at once; stop or wait for a run first."
    manager = get_manager()
    ids = []
    for label, model, extra in jobs:
        kwargs = {**train_kwargs, **extra}
        kwargs.setdefault("eval_every", eval_every(kwargs.get("steps", 300)))
        ids.append(manager.start(model, task, label=label, **kwargs).id)
    ss.setdefault("groups", {})[group] = ids
    if url:
        st.query_params[group] = ",".join(ids)
    return None


def eval_every(steps):
    """About ten points on the accuracy curve of a short run, one per 25 steps on long ones."""
    return max(5, min(25, steps // 10))


def stop_group(group):
    for run in group_runs(group):
        run.stop()


def stop_session_runs():
    for run in active_session_runs():
        run.stop()


def run_cache(run, what, compute):
    """Per-run results computed once (trainable count; after the run: file bytes, fingerprint...)."""
    cache = ss.setdefault("run_cache", {})
    key = (run.id, what)
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def run_summary(run):
    """The numbers of a finished (or running) run's result card."""
    facts = base_facts(device())
    trainable = run_cache(run, "trainable", lambda: run.model.get_nb_trainable_parameters()[0])
    last = run.last
    return dict(method=run.label, status=run.status, step=last.step if last else 0,
                steps=run.kwargs.get("steps", 0), trainable=trainable,
                phi_pct=100 * trainable / facts["params"],
                exact=last_eval(run, "eval_exact"), token=last_eval(run, "eval_token"),
                seconds=last.elapsed if last else 0.0,
                steps_per_s=last.step / last.elapsed if last and last.elapsed > 0 else 0.0)


def last_eval(run, field):
    for event in reversed(run.events):
        value = getattr(event, field)
        if value is not None:
            return value
    return None


def live_runs(group):
    """Progress bars, a Stop button and overlaid loss / accuracy curves of a group's runs,
    polled every POLL_S seconds while any run is active; a full rerun once all end."""
    runs = group_runs(group)
    if not runs:
        return
    polling = any(not r.finished for r in runs)

    @st.fragment(run_every=POLL_S if polling else None)
    def panel():
        runs = group_runs(group)
        for run in runs:
            progress_line(run)
        if any(not r.finished for r in runs):
            st.button("Stop", key=f"stop-{group}", on_click=stop_group, args=(group,), type="primary",
                      help="Stops every run of this group after its current step; phi keeps what it learned.")
        plot(runs_figure(runs), key=f"curves-{group}")
        if polling and all(r.finished for r in runs):
            st.rerun()  # the result cards below the panel appear; polling stops

    panel()


def progress_line(run):
    s = run_summary(run)
    exact = "-" if s["exact"] is None else f"{100 * s['exact']:.1f}%"
    text = (f"**{run.label}** · {run.status} · step {s['step']}/{s['steps']} · "
            f"{s['steps_per_s']:.1f} steps/s · held-out exact match {exact}")
    st.progress(s["step"] / s["steps"] if s["steps"] else 0.0, text=text)
    if run.error:
        st.error(f"{run.label} failed: {run.error}")


# ------------------------------------------------------------------ charts
FONT = dict(size=20)
GRID = dict(gridcolor="#e5e5e5", zerolinecolor="#cccccc", automargin=True)
# A white background set by hand: a named template costs ~10 ms a figure to build and copy.
LAYOUT = dict(font=FONT, template="none", paper_bgcolor="white", plot_bgcolor="white",
              margin=dict(l=70, r=30, t=60, b=60),
              legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, font=FONT),
              hoverlabel=dict(font=dict(size=18)))


def figure(traces, **layout):
    """A plotly figure as a plain dict (fast to build), styled for a projector."""
    for axis in [k for k in layout if k.startswith(("xaxis", "yaxis"))]:
        layout[axis] = {**GRID, **layout[axis]}
        if layout[axis].get("type") == "log" and "tickvals" not in layout[axis]:
            layout[axis].setdefault("nticks", 6)  # no crowd of 2..9 labels inside a decade
    return {"data": traces, "layout": {**LAYOUT, **layout}}


def plot(fig, key=None, height=None):
    st.plotly_chart(fig, theme=None, width="stretch", height=height or "content", key=key,
                    config={"displaylogo": False})


def runs_figure(runs):
    """Training loss (top, log scale) and held-out exact match (bottom) against step, one
    colour per run, in one figure with one legend: readable from the back of a room."""
    traces = []
    for i, run in enumerate(runs):
        events = list(run.events)  # a snapshot: the worker keeps appending
        evals = [e for e in events if e.eval_exact is not None]
        style = dict(name=run.label, legendgroup=run.label,
                     line=dict(width=4, color=COLORS.get(run.label, PALETTE[i % len(PALETTE)])))
        traces.append(dict(type="scatter", mode="lines", x=[e.step for e in events], y=[e.loss for e in events],
                           hovertemplate="step %{x}: loss %{y:.3g}", **style))
        traces.append(dict(type="scatter", mode="lines+markers", x=[e.step for e in evals],
                           y=[100 * e.eval_exact for e in evals], showlegend=False, yaxis="y2",
                           hovertemplate="step %{x}: %{y:.1f}% exact", **style))
    steps = max((r.kwargs.get("steps", 0) for r in runs), default=0)
    return figure(traces, height=620, hovermode="closest",
                  xaxis=dict(title="step", anchor="y2", range=[0, steps * 1.02]),  # the whole budget from the start
                  yaxis=dict(title="training loss", type="log", domain=[0.56, 1]),
                  yaxis2=dict(title=f"exact match %<br>({EVAL_SIZE} held-out)", domain=[0, 0.44], range=[-3, 103]))


def fmt_num(x):
    """Short numbers for sentences: 1.5, 100, 1.005, 12,345."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def predictions_table(rows):
    """Inputs, targets and greedy outputs, wrong output digits highlighted in red."""
    right, wrong = ":green[:material/check_circle: right]", ":red[:material/cancel: wrong]"
    lines = ["| task | input | target | output | |", "|---|---|---|---|---|"]
    for r in rows:
        out = "".join(f":red-background[**{c}**]" if bad else c for c, bad in zip(r["output"], r["wrong"]))
        lines.append(f"| {r['task']} | {r['input']} | {r['target']} | {out} | {right if r['correct'] else wrong} |")
    st.markdown("\n".join(lines))
