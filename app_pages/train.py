"""Train a sliver: pick a task and a method, train phi live, or race the methods."""
from dataclasses import replace
from urllib.parse import urlencode, urlsplit, urlunsplit

import streamlit as st

import peftcore
import ui
from peftcore import hf_code
from peftcore.analysis import changed_weights, digit_accuracy, sample_predictions
from peftcore.presets import PRESETS, SOLVES_AT, longer_budget, robustness
from peftcore.storage import human_bytes
from peftcore.tasks import EVAL_SIZE
from peftcore.train import SOLVED
from ui.exercise import (LR_OPTIONS, STEPS, control, exercise, from_exercise, method_key, set_control, shown,
                         unless_set)

GROUP = "train"
ss = st.session_state


def exercise_notes():
    ex = exercise()
    if ex["problems"]:
        st.warning("This link had values that do not fit: " + "; ".join(ex["problems"]) + ".")
    if ex["locked"] or ex["hidden"]:
        view = ui.view_named(ex["values"].get("method", ui.method_views()[0].name))
        relevant = ["task", "method", *(c.name for c in view.controls), "lr", "steps"]
        free = [n for n in relevant if n not in ex["locked"] | ex["hidden"]]
        st.info("An exercise from your teacher: you may change " + (", ".join(f"`{n}`" for n in free) or "nothing")
                + (" (some settings are hidden)." if ex["hidden"] else "."))


def class_link(task, method, config, lr, steps):
    """Build an exercise link from this page's current settings, for a teacher to share."""
    with st.expander("Copy link for the class"):
        # pills that wrap: a multiselect cuts names such as num_virtual_tokens short in a column
        view = ui.view_named(method)
        names = ["task", "method", *(c.name for c in view.controls), "lr", "steps"]  # this method's, in order
        free = st.pills("Students may change", names, selection_mode="multi", default=names, key="link_only", wrap=True)
        hidden = st.pills("Hidden from students", names, selection_mode="multi", key="link_hide", wrap=True)
        settings = {}
        for c in view.controls:
            value = getattr(config, c.field)
            settings[c.name] = ",".join(value) if isinstance(value, (list, tuple)) else \
                str(value).lower() if c.kind in ("toggle", "choice") else value
        params = dict(task=task, method=method, **settings, lr=f"{lr:g}", steps=steps)
        if set(free) != set(names):
            params["only"] = ",".join(free)
        if hidden:
            params["hide"] = ",".join(hidden)
        here = urlsplit(page_url())
        link = urlunsplit((here.scheme, here.netloc, here.path, urlencode(params, safe=","), ""))
        st.code(link, language=None, wrap_lines=True)  # the whole link in view, not behind a scrollbar
        st.caption("The copy button is at the code's right. A hidden control still takes its value from the link.")


def page_url():
    """This page's address as the teacher's browser has it (the students use the same host)."""
    if st.context.url:
        return st.context.url
    headers = st.context.headers
    origin = headers.get("Origin") or (f"http://{headers['Host']}" if headers.get("Host") else "http://localhost:8501")
    return f"{origin}/train"


def method_widgets(view, preset_config):
    """The view's controls, two sliders to a row, pills on a row of their own; returns the
    preset's config with what the student set."""
    values, row, groups = {}, [], {}
    for c in view.controls:
        default, key = getattr(preset_config, c.field), method_key(view, c)
        if c.group:
            if c.group not in groups:
                groups[c.group], row = st.expander(c.group), []
            with groups[c.group]:
                values[c.field] = option_widget(c, default, key)
            continue
        if c.kind == "subset":
            # pills, not a multiselect, told to wrap: in a column every option stays in view
            values[c.field] = tuple(control(c.name, list(default), lambda **kw: st.pills(
                c.label, c.options, selection_mode="multi", wrap=True, default=unless_set(key, list(default)),
                key=key, help=c.help, **kw)) or ())
            continue
        if not row:
            row = list(st.columns(2)) if c.kind is int else [st.container()]
        where = row.pop(0)
        values[c.field] = control(c.name, default, lambda **kw: where.slider(
            c.label, c.lo, c.hi, unless_set(key, default), c.step, key=key, help=c.help, **kw))
    if view.note:
        st.caption(view.note)
    config = replace(preset_config, **values)
    if view.explain:
        st.caption(view.explain(config))
    return config


def option_widget(c, default, key):
    """A toggle, a choice of one or a slider, for a control folded under its group."""
    if c.kind == "toggle":
        return control(c.name, default, lambda **kw: st.toggle(
            c.label, value=bool(unless_set(key, default)), key=key, help=c.help, **kw))
    if c.kind == "choice":
        chosen = unless_set(key, default)
        return control(c.name, default, lambda **kw: st.radio(
            c.label, c.options, index=None if chosen is None else c.options.index(chosen), format_func=c.label_of,
            horizontal=True, key=key, help=c.help, **kw))
    return control(c.name, default, lambda **kw: st.slider(
        c.label, c.lo, c.hi, unless_set(key, default), c.step, key=key, help=c.help, **kw))


def phi_params(config, facts):
    n = config.num_params(facts["config"])
    return facts["params"] if n is None else n


def one_method(task):
    """Widgets for one method; returns [(label, config, train kwargs)]."""
    names = [v.name for v in ui.method_views()]
    method = control("method", names[0], lambda **kw: st.selectbox(
        "Method", names, key="method", help="How phi plugs into the frozen base.", **kw))
    view = ui.view_named(method)
    preset = PRESETS[view.peft_type]
    config = method_widgets(view, preset.config)
    a, b = st.columns(2)
    lr = control("lr", preset.train["lr"], lambda **kw: a.select_slider(
        "Learning rate", LR_OPTIONS, value=unless_set(f"lr-{method}", preset.train["lr"]), key=f"lr-{method}",
        format_func=lambda v: f"{v:g}", help="AdamW's peak learning rate (warmup, then cosine).", **kw))
    steps = control("steps", preset.train["steps"], lambda **kw: b.slider(
        "Steps", value=unless_set(f"steps-{method}", preset.train["steps"]), key=f"steps-{method}",
        help=f"Batches of {preset.train['batch_size']} examples.", **STEPS, **kw))
    if not from_exercise():  # the teacher's tool: a student who came through a link never sees it
        class_link(task, method, config, lr, steps)
    return [(method, config, dict(preset.train, lr=lr, steps=steps))]


def race():
    """Widgets for a race: several methods, each with its preset, the same steps."""
    # pills that wrap: a multiselect in this column hid the last methods behind the others
    names = [v.name for v in ui.method_views()]
    default = [v.name for v in ui.method_views() if v.in_default_race]
    methods = st.pills("Methods", names, selection_mode="multi", wrap=True, key="race_methods",
                       default=unless_set("race_methods", default),
                       help="They train side by side on the same task and seed.")
    presets = {m: PRESETS[ui.view_named(m).peft_type] for m in methods}
    longest = max(p.train["steps"] for p in PRESETS.values())
    steps = st.slider("Steps (each method)", value=unless_set("race_steps", longest), key="race_steps",
                      help="The same number of batches for every method: a fair race.", **STEPS)
    return [(m, p.config, dict(p.train, steps=steps)) for m, p in presets.items()]


def check(specs, facts):
    """Validate every config; show phi's size; return the error messages."""
    errors = []
    for label, config, kw in specs:
        try:
            config.validate()
        except ValueError as e:
            errors.append(f"{label}: {e}")
            continue
        n = phi_params(config, facts)
        settings = {"lr": f"lr {kw['lr']:g}", "steps": f"{kw['steps']} steps"}
        st.caption(f"**{label}**: phi = {n:,} trainable parameters, {100 * n / facts['params']:.3g}% of the "
                   f"base's {facts['params']:,}" + "".join(f" · {t}" for k, t in settings.items() if shown(k)))
    for e in errors:
        st.error(e)
    if not specs:
        errors.append("pick at least one method")
        st.error("Pick at least one method.")
    return errors


def start(specs, task, stop_when_solved):
    """Start the runs; an error message (over a limit) instead, with nothing started."""
    return ui.start_group(GROUP, specs, task, url=True, seed=ui.seed(), device=ui.device(),
                          stop_when_solved=stop_when_solved, stop_when_stuck=stop_when_solved)


def restore_setup(runs):
    """A reopened link shows the setup its runs were started with, not today's defaults."""
    if not runs or "mode" in ss:
        return
    set_control("task", runs[0].task)
    if len(runs) > 1:
        setup = {"mode": "Race", "race_methods": [r.label for r in runs], "race_steps": runs[0].steps}
    else:
        setup = {"mode": "One method", "method": runs[0].label, f"steps-{runs[0].label}": runs[0].steps}
    for key, value in setup.items():
        set_control(key, value)


# Why no preset reaches SOLVES_AT on a task: the lesson in a 0-of-5 row (a method's own
# reason, where it has one, is in its view: view.never_solves)
NEVER_SOLVED_WHY = {
    "sort": "Sorting compares every digit with every other; the base learned digit maps and routings "
            "only, and no method (full fine-tuning included) finds sorting in a live budget.",
}


def reached(rec):
    """A recorded row's held-out exact match over its seeds, as a student reads it: 12-33%."""
    low, high = round(100 * rec["min"]), round(100 * rec["max"])
    return f"{low}%" if low == high else f"{low}-{high}%"


def seed_note(methods, task):
    """How reliably each preset reaches SOLVES_AT on the task, from the recorded multi-seed
    table: one caption for all the methods, each reason a row never does said once, and
    what a longer budget reached where one was recorded (so "not in a live run" is not
    read as "never")."""
    recs = {m: r for m in methods if (r := robustness(ui.view_named(m).peft_type, task))}
    lines, whys = [], []
    for method, rec in recs.items():
        lines.append(f"{method}'s preset: **{rec['solved']} of {rec['seeds']} seeds** (reached {reached(rec)})")
        why = NEVER_SOLVED_WHY.get(task) or ui.view_named(method).never_solves
        if rec["solved"] == 0 and why and why not in whys:
            whys.append(why)
    longer = []  # where a chosen preset misses: the chosen methods first, then every other one recorded
    if any(r["solved"] < r["seeds"] for r in recs.values()):
        for method in [*recs, *(v.name for v in ui.method_views() if v.name not in recs)]:
            if more := longer_budget(ui.view_named(method).peft_type, task):
                steps, row = more
                longer.append(f"{method} with {steps} steps reached {reached(row)} "
                              f"({row['solved']} of {row['seeds']} seeds at {100 * SOLVES_AT:.0f}%+)")
    if lines:
        # two bars on one screen, each named, and "solved" kept for the live run's SOLVED alone: the
        # recorded table counts a seed that reaches SOLVES_AT
        st.caption(f"How often the preset reaches {100 * SOLVES_AT:.0f}% held-out exact match or more on {task} "
                   f"(the recorded table's bar; a live run stops at {100 * SOLVED:.0f}%, twice in a row), "
                   "measured over seeds: " + "; ".join(lines) + "." + "".join(f" {w}" for w in whys)
                   + (" Given more steps than a live run (recorded): " + "; ".join(longer) + "." if longer else ""))


def why_not_solved(run, s):
    """Why a run that did not solve its task reached what it reached: the task's or the method's
    reason where its preset never solves it, else what the preset reaches over seeds."""
    view, exact = ui.run_view(run), "no evaluation" if s["exact"] is None else f"{100 * s['exact']:.1f}%"
    how = ("it stopped improving" if ui.stopped_improving(run, s) else
           "it was stopped" if run.status == "stopped" else
           f"its {s['step']} steps ran out" if shown("steps") else "its step budget ran out")  # a teacher may hide it
    said = f"{view.name} reached {exact} held-out exact match on {run.task}: {how}. "
    rec = robustness(view.peft_type, run.task)
    why = NEVER_SOLVED_WHY.get(run.task) or (view.never_solves if rec and rec["solved"] == 0 else "")
    if why:
        return said + why
    if rec:
        return said + (f"Its preset reaches {reached(rec)} over {rec['seeds']} seeds (recorded) and solves "
                       f"{rec['solved']} of them: a changed setting, seed or budget can fall short of that.")
    return said


def result_card(run):
    s = ui.run_summary(run)
    model = run.model
    data = ui.run_cache(run, "file", lambda: peftcore.adapter_to_bytes(model, "default"))
    after = ui.run_cache(run, "fingerprint", lambda: peftcore.fingerprint(ui.get_base(ui.device())))
    if run.shared:
        st.info(f"This run was shared: {run.joined + 1} starts with the same base, config, task, seed and budget "
                "were computed once. Every one of them gets this same phi.")
    if s["solved_step"]:
        st.success(f"Solved at step {s['solved_step']} ({s['solved_s']:.1f} s): held-out exact match of "
                   f"{100 * SOLVED:.0f}% or more at two evaluations in a row.")
    else:
        st.info(why_not_solved(run, s), icon=":material/info:")
    cols = st.columns(3) + st.columns(3)  # two rows of three: each number whole in the page's right column
    cols[0].metric("trainable parameters", f"{s['trainable']:,}")
    cols[1].metric("phi % of base", f"{s['phi_pct']:.3g}%")
    cols[2].metric("phi file", human_bytes(len(data)), help=f"{len(data):,} bytes as .safetensors")
    cols[3].metric("held-out exact match", "-" if s["exact"] is None else f"{100 * s['exact']:.1f}%",
                   help=f"All 8 answer digits right, on {EVAL_SIZE} examples never trained on.")
    cols[4].metric("digit accuracy", "-" if s["token"] is None else f"{100 * s['token']:.1f}%")
    rate = f"{s['steps_per_s']:.1f} steps/s"  # the steps run would say a hidden budget
    cols[5].metric("time", f"{s['seconds']:.1f} s", help=(f"{s['step']} steps at " if shown("steps") else "") + rate)
    digits_chart(run)
    same = after == model.base_fingerprint
    prints = f"Shared base fingerprint (sha256) before `{model.base_fingerprint[:16]}…` · after `{after[:16]}…` · "
    if not ui.run_view(run).method.shares_base:  # a whole copy: say what changed, not "only phi"
        changed, total = ui.run_cache(run, "changed", lambda: changed_weights(model, ui.get_base(ui.device())))
        st.markdown(f"Full fine-tuning trained a private **copy** of the base: every weight received gradients, and "
                    f"**{changed:,} of its {total:,} weights changed** ({100 * changed / total:.1f}%). Storing this "
                    f"task means storing that whole copy ({human_bytes(len(data))}). "
                    + prints + ("**unchanged**: the copy trained, not the base other visitors share."
                                if same else "**CHANGED**"))
    else:
        st.markdown(prints + ("**unchanged**: the base never received a gradient; only phi trained."
                              if same else "**CHANGED**"))
    rows = ui.run_cache(run, f"samples-{ui.seed()}", lambda: sample_predictions(model, run.task, n=6, seed=ui.seed()))
    ui.predictions_table(rows)
    save_and_download(run, data)


def digits_chart(run):
    """Each answer digit's held-out accuracy: where a run goes wrong, which one exact-match
    number hides (prefix tuning on add_5, a task since replaced, missed only the first and last digit)."""
    accs = ui.run_cache(run, "digits", lambda: digit_accuracy(run.model, run.task))
    places = list(range(1, len(accs) + 1))
    ui.plot(ui.figure([dict(type="bar", x=places, y=[100 * a for a in accs], marker=dict(color=ui.run_view(run).color),
                            text=[f"{100 * a:.0f}%" for a in accs], textposition="outside", cliponaxis=False,
                            hovertemplate="answer digit %{x}: %{y:.1f}% right")],
                      height=300, margin=dict(l=70, r=30, t=30, b=60), showlegend=False,
                      xaxis=dict(title="answer digit", tickvals=places),
                      yaxis=dict(title="right (%)", range=[0, 115], tickvals=[0, 50, 100])),
            digits_summary(accs), key=f"digits-{run.id}")


def digits_summary(accs):
    worst = min(range(len(accs)), key=accs.__getitem__)
    each = ", ".join(f"digit {i + 1} {100 * a:.0f}%" for i, a in enumerate(accs))
    return (f"Each of the {len(accs)} answer digits on its own, on the {EVAL_SIZE} held-out examples ({each}): exact "
            "match needs all of them right at once. "
            + (f"Weakest: digit {worst + 1}, {100 * accs[worst]:.1f}% right." if accs[worst] < 1
               else "Every digit is right on every example."))


def save_and_download(run, data):
    view = ui.run_view(run)
    slug, bankable = view.method.slug, view.method.shares_base
    a, b, c = st.columns([2, 1, 1], vertical_alignment="bottom")
    name = a.text_input("Name in your bank", value=ui.unique_name(f"{slug}-{run.task}"), key=f"name-{run.id}",
                        max_chars=64, help="Letters, digits, '_' and '-'.", disabled=not bankable)
    if not bankable:
        a.caption("A full fine-tune is a whole model, not a sliver: it cannot join a bank of phi over the shared base.")
    elif b.button("Save to my bank", key=f"save-{run.id}", width="stretch"):
        try:
            ui.add_to_bank(name, data)
            st.success(f"Saved {ui.literal(name)} to your bank: see *Many tasks at once*.")
        except peftcore.AdapterLoadError as e:
            st.error(f"Not saved: {e}")
    c.download_button("Download", data, file_name=f"{name or slug}.safetensors", key=f"dl-{run.id}",
                      mime="application/octet-stream", width="stretch",
                      help="One self-contained file: tensors plus config in its header. Upload it on *Many tasks at once*.")
    hf_peft_code(run, f"{name or slug}.safetensors")


def hf_peft_code(run, file_name):
    """What this run built, as HF peft code to copy: on a real model, and on this base with the file."""
    config, view = run.model.peft_config[run.model.active_adapter], ui.run_view(run)
    real, here = hf_code.on_a_real_model(config, run.kwargs["lr"]), hf_code.on_this_base(config, file_name)
    with st.expander("Copy as HF peft code"):
        if real is None:
            st.markdown(view.not_in_hf_peft)
            return
        st.markdown(f"The same config in HF peft, under peft's names, on a real model ({hf_code.REAL_MODEL}, "
                    "whose projections are called q_proj, k_proj ...):")
        st.code(real, language="python", wrap_lines=True)  # a phone: no sideways scroll
        if here:
            st.markdown("And on this app's own base, loading the file *Download* gives you: the same outputs "
                        "as here, to 1e-5 (a test checks it).")
            st.code(here, language="python", wrap_lines=True)
        else:
            st.caption(f"HF peft runs {view.name} on transformers models only, not on a plain torch module "
                       "like this app's base, so there is no code for this base.")


def beside_full_fine_tuning(run):
    """The lesson on the first click: this run's phi beside full fine-tuning, its parameters
    counted and its accuracy as measured over seeds (the recorded table), so that one short run
    already shows PEFT matching a whole fine-tune with a sliver of the parameters."""
    s, facts = ui.run_summary(run), ui.base_facts(ui.device())
    rows = [{"phi": f"{run.label}, this run", "trainable parameters": f"{s['trainable']:,}",
             "of the base": f"{s['phi_pct']:.3g}%",
             "held-out exact match": "-" if s["exact"] is None else f"{100 * s['exact']:.1f}%"}]
    for view in [ui.run_view(run), *ui.method_views(shares_base=False)]:
        rec, preset = robustness(view.peft_type, run.task), PRESETS[view.peft_type]
        if rec:
            n = phi_params(preset.config, facts)
            rows.append({"phi": f"{view.name}'s preset, {rec['seeds']} seeds (recorded)",
                         "trainable parameters": f"{n:,}", "of the base": f"{100 * n / facts['params']:.3g}%",
                         "held-out exact match": reached(rec)})
    if len(rows) > 1:
        st.markdown(f"**Beside full fine-tuning** on {run.task}: the same task, a whole model's parameters trained.")
        st.table(rows, hide_index=True)
        st.caption("Recorded rows: `python -m bench.presets` over seeds on this base; race them live in **Race** mode.")


def solved_text(run, summary):
    """The race table's "solved at step": the step, "not solved" once the run is over, else "-"."""
    if summary["solved_step"]:
        return str(summary["solved_step"])
    if ui.stopped_improving(run, summary):
        return f"not solved: stopped improving at step {summary['step']}"
    return "not solved" if run.finished else "-"


def results(runs):
    if len(runs) > 1:
        rows = [ui.run_summary(r) for r in runs]
        # a static table: its cells wrap to the column, so no column is cut off behind a scrollbar
        st.table([{"method": s["method"], "status": s["status"], "trainable params": f"{s['trainable']:,}",
                   "phi %": f"{s['phi_pct']:.3g}%", "exact match": "-" if s["exact"] is None else f"{100 * s['exact']:.1f}%",
                   "solved at step": solved_text(run, s), "seconds": f"{s['seconds']:.1f}"}
                  for run, s in zip(runs, rows)], hide_index=True)
        st.caption(f"Solved: {100 * SOLVED:.0f}% held-out exact match or more at two evaluations in a row.")
    elif runs[0].status != "failed" and ui.run_view(runs[0]).method.shares_base:
        beside_full_fine_tuning(runs[0])
    tabs = st.tabs([r.label for r in runs])
    for tab, run in zip(tabs, runs):
        with tab:
            if run.status == "failed":
                st.error(f"{run.label} failed: {run.error}")
            else:
                result_card(run)


st.title("Train a sliver")
st.markdown(
    "Pick a task the base never saw and a way to plug **phi** into it, then press **Train**. Only phi gets "
    "gradients: the base's fingerprint is the same after training. In **race** mode several methods train "
    "on the same task at once, full fine-tuning included, so you can compare accuracy per parameter.")

facts = ui.base_facts(ui.device())
runs = ui.group_runs(GROUP)
restore_setup(runs)
busy = any(not r.finished and ui.owns(r) for r in runs)
# On a phone the two columns stack: the page frame puts Train and the curve first there (key
# "train_layout"), then the set-up, so Train is not below every control.
setup, live = st.container(key="train_layout").columns([1, 2.2], gap="large")
specs, task, errors = [], None, ["the set-up could not be drawn"]  # what a failed set-up leaves: no Train
with setup, ui.panel("The training set-up"):
    exercise_notes()
    in_exercise = bool(exercise()["locked"] or exercise()["hidden"])  # an exercise is one method
    mode = st.radio("Mode", ["One method", "Race"], horizontal=True, key="mode", disabled=in_exercise,
                    help="Race: several methods on one task, curves overlaid.")
    task = control("task", "times_3", lambda **kw: st.selectbox(
        "Task", list(peftcore.TASKS), key="task", help="Downstream tasks the base was not pretrained on.", **kw))
    st.caption(peftcore.TASKS[task].description)
    specs = one_method(task) if mode == "One method" or in_exercise else race()
    seed_note([label for label, _, _ in specs], task)
    errors = check(specs, facts)
with live, ui.panel("Training"):  # Train and the live curve at the top: in view on a laptop or a projector
    go, until = st.columns([1, 1], vertical_alignment="center")
    until_solved = until.checkbox("Stop when solved", value=True, key="until_solved",
                                  help=f"End a run once its held-out exact match is {100 * SOLVED:.0f}% or more at "
                                       "two evaluations in a row (steps-to-solve is a fairer race than a fixed "
                                       f"budget), or once its held-out exact match has not improved in {ui.PATIENCE_STEPS} steps "
                                       "(it has stopped improving: a race ends when its slowest run goes nowhere).")
    if go.button("Train", key="train_go", type="primary", disabled=bool(errors) or busy, width="stretch",
                 help="Starts the run(s) on the server; they keep going if you switch pages."):
        error = start(specs, task, until_solved)
        if error:
            st.error(error)
        else:
            st.rerun()  # the Train button greys out and the live panel starts polling
    ui.live_runs(GROUP)
    if not runs:
        st.info("No run yet: choose a task and a method in the set-up, then press **Train**.")
runs = ui.group_runs(GROUP)
if runs and all(r.finished for r in runs):  # right under the curve, not below every control
    with live, ui.panel("The results"):
        st.header(f"Results on {runs[0].task}")
        results(runs)
