"""Inside: where each phi plugs into a transformer block, why a small update is enough,
and why the pretrained base matters."""
from dataclasses import replace

import streamlit as st

import peftcore
import ui
import views
from peftcore import analysis
from peftcore.presets import PRESETS, SOLVES_AT, robustness


def methods_section(facts):
    st.header("Where phi plugs in")
    shown = ui.method_views()
    tabs = st.tabs([v.name for v in shown])
    for tab, view in zip(tabs, shown):
        with tab:
            config = PRESETS[view.peft_type].config
            diagram, text = st.columns([1, 1.3], gap="large")
            diagram.graphviz_chart(views.block_dot(view, config), width="stretch")
            with text:
                for formula in view.formulas:
                    st.latex(formula)
                n = config.num_params(facts["config"]) or facts["params"]
                st.markdown(f"{view.words}\n\nThe preset here, `{config}`, trains **{n:,}** parameters: "
                            f"**{100 * n / facts['params']:.3g}%** of the base's {facts['params']:,}. "
                            "In the diagram, orange is phi (trained), blue is the frozen base.")


def spectrum_section(facts):
    st.header("The update is small")
    st.markdown(
        f"{ui.low_rank_view().name} bets that the change fine-tuning makes to a weight matrix, Delta W, lives in a few directions. "
        "Check it: fine-tune **every** weight for a short budget, subtract the base, and look at the singular "
        "values of Delta W. A random matrix of the same size spreads its energy evenly; a low-rank one puts "
        "most of it in its first few directions.")
    full = ui.method_views(shares_base=False)[0]  # the whole-copy baseline
    preset = PRESETS[full.peft_type]
    a, b, c = st.columns([2, 2, 1], vertical_alignment="bottom")
    task = a.selectbox("Task", list(peftcore.TASKS), key="spectrum_task")
    steps = b.slider("Steps of full fine-tuning", 20, 300, 100, 10, key="spectrum_steps",
                     help=f"learning rate {preset.train['lr']:g}, batch {preset.train['batch_size']}")
    runs = ui.group_runs("spectrum")
    if c.button("Fine-tune fully", key="spectrum_go", disabled=any(not r.finished for r in runs), width="stretch"):
        start("spectrum", [(full.name, preset.config, {})], task, **{**preset.train, "steps": steps})
    ui.live_runs("spectrum")
    runs = ui.group_runs("spectrum")
    if runs and all(r.finished for r in runs) and runs[0].status != "failed":
        show_spectrum(runs[0])


def show_spectrum(run):
    low_rank = ui.low_rank_view()
    r = low_rank.rank(PRESETS[low_rank.peft_type].config)
    deltas = ui.run_cache(run, "deltas", lambda: analysis.delta_weights(run.model, ui.get_base(ui.device())))
    summary = ui.run_cache(run, f"summary-{r}", lambda: analysis.spectrum_summary(deltas, r))
    names = [row["projection"] for row in summary]
    name = st.selectbox("Projection", names, key="spectrum_proj",
                        help="Sorted by the size of their update, largest first.")
    sp = ui.run_cache(run, f"spectrum-{name}", lambda: analysis.spectrum(deltas[name]))
    k = list(range(1, len(sp["s"]) + 1))
    traces = [dict(type="scatter", mode="lines", name="Delta W after full fine-tuning", x=k,
                   y=[100 * e for e in sp["energy"]], line=dict(width=5, color=ui.run_view(run).color)),
              dict(type="scatter", mode="lines", name="random matrix, same size and norm", x=k,
                   y=[100 * e for e in sp["random_energy"]], line=dict(width=3, color="#999999", dash="dot")),
              dict(type="scatter", mode="markers+text", name=f"{low_rank.name} preset rank r = {r}", x=[r],
                   y=[100 * sp["energy"][r - 1]], text=[f"r = {r}: {100 * sp['energy'][r - 1]:.0f}%"],
                   textposition="middle right", textfont=dict(size=18),
                   marker=dict(size=16, color=low_rank.color, symbol="diamond"))]
    left, right = st.columns([2, 1], gap="large")
    with left:
        st.markdown(f"`{name}`: share of ‖Delta W‖² in the top k singular directions")
        # the legend above the plot, one entry per line: inside it covered the random curve
        ui.plot(ui.figure(traces, height=520, margin=dict(l=70, r=30, t=120, b=60),
                          legend=dict(orientation="v", x=0, y=1.02, yanchor="bottom", font=ui.FONT),
                          xaxis=dict(title="k (rank)", type="log"), yaxis=dict(title="% of energy", range=[0, 102])),
                f"Chart: for {name}, the share of Delta W's energy in its top k of {len(k)} singular directions. "
                f"After full fine-tuning the top {r} hold {100 * sp['energy'][r - 1]:.0f}% and the top "
                f"{min(4, len(k))} {100 * sp['energy'][min(4, len(k)) - 1]:.0f}%; a random matrix of the same size "
                f"and norm holds {100 * sp['random_energy'][r - 1]:.0f}% in its top {r}.",
                key="spectrum_chart")
    with right:
        row = summary[names.index(name)]
        st.metric(f"top {r} direction(s) of Delta W", f"{100 * row['energy']:.1f}%",
                  delta=f"{100 * (row['energy'] - row['random_energy']):+.1f} points vs random")
        top4 = sp["energy"][min(4, len(k)) - 1]
        st.metric("top 4 directions", f"{100 * top4:.1f}%")
        st.caption(f"Over all {len(summary)} projections, the top {r} direction(s) hold "
                   f"{100 * min(x['energy'] for x in summary):.0f}% to {100 * max(x['energy'] for x in summary):.0f}% "
                   f"of the update's energy; for random matrices, "
                   f"{100 * max(x['random_energy'] for x in summary):.1f}% at most.")


def skills_grid():
    """What the base learned, as a grid of skills, with the two cells it never saw."""
    exact, loss = ui.base_skills()
    grid = peftcore.skill_grid()
    rows = [{"routing": r, **{m: f"{t.name}: {100 * exact[t.name]:.0f}%" if t.name in exact else f"{t.name}: held out"
                              for m in peftcore.DIGIT_MAPS for t in [grid[r, m]]}}
            for r in peftcore.ROUTINGS]
    st.markdown("The base was pretrained on a grid of skills: where each answer digit comes from (a routing, the "
                "rows) times what is done to it (a digit map, the columns). Two cells were held out: they are "
                "downstream tasks, new compositions of skills the base has.")
    st.table(rows, hide_index=True)
    st.caption("Each pretraining cell: the shipped base's held-out exact match. " + ui.start_sentence(loss))



def pretraining_section():
    st.header("Pretraining matters")
    skills_grid()
    st.markdown(
        "PEFT steers what the base already knows. Train the same phi, with the same budget and seed, on the "
        "pretrained base and on a **randomly initialised** frozen base of the same shape.")
    a, b, c, d = st.columns([2, 2, 2, 1], vertical_alignment="bottom")
    task = a.selectbox("Task", list(peftcore.TASKS), key="pretrain_task")
    method = b.selectbox("Method", [v.name for v in ui.method_views(shares_base=True)], key="pretrain_method")
    preset = PRESETS[ui.view_named(method).peft_type]
    steps = c.slider("Steps", 20, 600, preset.train["steps"], 10, key="pretrain_steps",
                     help=f"learning rate {preset.train['lr']:g}, batch {preset.train['batch_size']}, on both bases")
    runs = ui.group_runs("pretraining")
    if d.button("Train both", key="pretrain_go", disabled=any(not r.finished for r in runs), width="stretch"):
        jobs = [(f"{method}, {which} base", preset.config, {"base": which}) for which in ("pretrained", "random")]
        start("pretraining", jobs, task, **{**preset.train, "steps": steps})
    ui.live_runs("pretraining")
    runs = ui.group_runs("pretraining")
    if runs and all(r.finished for r in runs):
        cols = st.columns(len(runs))
        for col, run in zip(cols, runs):
            s = ui.run_summary(run)
            col.metric(f"{run.label}: held-out exact match",
                       "-" if s["exact"] is None else f"{100 * s['exact']:.1f}%",
                       help=f"{s['step']} steps, {s['seconds']:.1f} s")
    st.caption(why_the_random_base(peftcore.TASKS[task], ui.view_named(method).peft_type))


def why_the_random_base(task, peft_type):
    """What a random base hands phi, measured now on the task's inputs, and what the preset
    reached on either base over 5 seeds (recorded)."""
    spread = {which: ui.attention_spread(which, task.name, ui.device()) for which in ("random", "pretrained")}
    span = {which: f"{max(v):.0%}" if round(100 * min(v)) == round(100 * max(v)) else f"{100 * min(v):.0f}-{max(v):.0%}"
            for which, v in spread.items()}
    text = (f"A random base's attention spreads evenly over the tokens each position sees ({span['random']} of an "
            f"even spread's entropy, layer by layer, on {task.name}'s inputs; the pretrained base's: "
            f"{span['pretrained']}). Each position reads an average of the tokens before it: which digits are "
            "present, not where they are. ")
    text += (f"{task.name}'s answer digits depend on where each digit is: phi has to learn where to look, which the "
             "pretrained base already knows."
             if task.reads_positions else
             f"{task.name}'s answer depends only on which digits are present, so the random base already hands phi "
             "what it needs, and the pretrained base's skills add little.")
    recorded = {base: robustness(peft_type, task.name, base) for base in ("pretrained", "random base")}
    if all(recorded.values()):
        text += (f" Recorded for this preset ({PRESETS[peft_type].train['steps']} steps) over "
                 f"{recorded['pretrained']['seeds']} seeds: median "
                 f"{100 * recorded['pretrained']['median']:.1f}% on the pretrained base, "
                 f"{100 * recorded['random base']['median']:.1f}% on the random one.")
    return text


def recorded_section(facts):
    """Every method's preset over 5 seeds on every task, from the recorded table: prompt tuning
    (the input only) beside prefix tuning (every layer), LoRA beside IA3, in measured numbers."""
    st.header("What each method reaches here")
    rows, machines = [], set()
    for view in ui.method_views():
        preset = PRESETS[view.peft_type]
        n = preset.config.num_params(facts["config"]) or facts["params"]
        row = {"method": view.name, "phi %": f"{100 * n / facts['params']:.3g}%"}
        for task in peftcore.TASKS:
            rec = robustness(view.peft_type, task)
            row[task] = "-" if rec is None else f"{rec['solved']} of {rec['seeds']} ({100 * rec['median']:.0f}%)"
            machines |= {rec["machine"]} if rec else set()
        rows.append(row)
    st.table(rows, hide_index=True)
    st.caption(f"Each preset, seeds 0-4: how many seeds reach {100 * SOLVES_AT:.0f}% held-out exact match, and the "
               "median seed's score in brackets (python -m bench.presets --seeds 5). Measured on "
               + "; ".join(sorted(machines)) + ".")
    for view in ui.method_views():
        if view.lesson or view.never_solves:
            st.markdown(f"**{view.name}**: {view.lesson or view.never_solves}")


def family_section(facts):
    """The low-rank family side by side: each member's phi on this toy, what it trains, whether
    it merges, what its preset reaches here (the recorded table) and HF peft's own figure."""
    members = [(v, v.name, {}, v.trains, v.benchmark) for v in ui.method_views() if v.family] + \
              [(v, m.name, m.options, m.trains, m.benchmark) for v in ui.method_views() if v.family for m in v.variants]
    if not members:
        return
    st.header(f"The {members[0][0].family} family")
    rows = []
    for view, name, options, trains, benchmark in members:
        config = replace(PRESETS[view.peft_type].config, **options)
        n = config.num_params(facts["config"])
        row = {"method": name, "phi": f"{n:,} ({100 * n / facts['params']:.2g}%)", "trains": trains,
               "merges": "yes" if view.method.mergeable else "no"}
        for task in peftcore.TASKS:
            rec = robustness(view.peft_type, task, options=options)
            row[task] = "-" if rec is None else f"{rec['solved']} of {rec['seeds']} ({100 * rec['median']:.0f}%)"
        row["HF peft's benchmark"] = "-" if benchmark is None else f"{100 * benchmark.accuracy:.1f}% ({benchmark.setting})"
        rows.append(row)
    st.table(rows, hide_index=True)
    for view in ui.method_views():
        for member in view.variants:
            if member.why:
                st.markdown(f"**{member.name}**: {member.why}")
    st.markdown(rank_is_not_all("sort", [v for v, _, options, *_ in members if not options]))


def rank_is_not_all(task, family):
    """What a higher-rank update buys on the task no live budget solves, from the table."""
    reached = [(v.rank(PRESETS[v.peft_type].config), v.name, robustness(v.peft_type, task)) for v in family if v.rank]
    reached = sorted((r, name, rec) for r, name, rec in reached if rec)
    if len(reached) < 2:
        return ""
    parts = [f"{name} (rank up to {r}) {100 * rec['median']:.0f}%" for r, name, rec in reached]
    verdict = ("none of them solves it on any seed: more rank from few parameters does not make a new algorithm in "
               "a live budget" if not any(rec["solved"] for *_, rec in reached) else
               "more rank helps here: " + ", ".join(f"{name} solves it on {rec['solved']} of {rec['seeds']} seeds"
                                                    for _, name, rec in reached if rec["solved"]))
    return (f"**Is rank what {task} lacks?** The presets' updates reach very different ranks; on {task} their "
            f"median seeds reach {', '.join(parts)}: {verdict}.")
    st.caption(f"Each member's preset (a variant is the preset with its option set), seeds 0-4: how many seeds reach "
               f"{100 * SOLVES_AT:.0f}% held-out exact match, and the median seed's score (python -m bench.presets "
               f"--seeds 5; '-' where not recorded). The last column is not measured here: {views.PEFT_BENCHMARK}.")


def start(group, jobs, task, **train_kwargs):
    error = ui.start_group(group, jobs, task, url=True, seed=ui.seed(), device=ui.device(), **train_kwargs)
    if error:
        st.error(error)
    else:
        st.rerun()


st.title("Inside: why it works")
ways = [v.name for v in ui.method_views(shares_base=True)]
st.markdown(
    f"{len(ways)} ways to add a small trainable **phi** to a frozen transformer ({', '.join(ways)}), and full "
    "fine-tuning beside them as the baseline: what each one computes, and two experiments you can run here: how "
    "small the change of a full fine-tune really is, and what PEFT can do without a pretrained base.")
facts = ui.base_facts(ui.device())
for section, what in [(lambda: methods_section(facts), "The methods"), (lambda: recorded_section(facts), "The table"),
                      (lambda: family_section(facts), "The family table"),
                      (lambda: spectrum_section(facts), "The spectrum"), (pretraining_section, "The pretraining experiment")]:
    with ui.panel(what):
        section()
