"""Inside: where each phi plugs into a transformer block, why a small update is enough,
and why the pretrained base matters."""
import streamlit as st

import peftcore
import ui
from peftcore import analysis
from peftcore.presets import PRESETS

PEFT_METHODS = ["LoRA", "Adapter", "Prompt tuning"]
PHI = 'fillcolor="#ffb74d", color="#e65100", penwidth=2'  # how a phi node looks in the diagrams

# The block's own path: (node, label) in order; every arrow between consecutive nodes.
BLOCK = [("x", "x"), ("ln1", "LayerNorm"), ("q", "q"), ("attn", "attention"), ("o", "o"),
         ("add1", "+"), ("ln2", "LayerNorm"), ("up", "up"), ("gelu", "GELU"), ("down", "down"),
         ("add2", "+"), ("out", "to the next block")]
# Where a LoRA on each projection sits: the node before and after it on the block's path.
LORA_AROUND = {"q": ("ln1", "attn"), "k": ("ln1", "attn"), "v": ("ln1", "attn"), "o": ("attn", "add1"),
               "up": ("ln2", "gelu"), "down": ("gelu", "add2")}

MATH = {  # (formulas, words) per method
    "LoRA": ([r"h = W x + \frac{\alpha}{r}\, B A x",
              r"A \in \mathbb{R}^{r \times d_{in}},\quad B \in \mathbb{R}^{d_{out} \times r},\quad B_0 = 0",
              r"|\phi| = r\,(d_{in} + d_{out}) \text{ per projection}"],
             "A low-rank update beside each targeted projection; W stays frozen. B starts at zero, so training "
             "starts from exactly the base."),
    "Adapter": ([r"h \leftarrow h + W_{up}\, \mathrm{GELU}(W_{down}\, h)",
                 r"W_{down} \in \mathbb{R}^{b \times d},\quad W_{up} \in \mathbb{R}^{d \times b},\quad W_{up,0} = 0",
                 r"|\phi| = 2\,(2 d b + b + d) \text{ per block}"],
                "A small bottleneck MLP after the attention and after the MLP of every block."),
    "Prompt tuning": ([r"X' = [\,P\,;\, E(x)\,]", r"P \in \mathbb{R}^{n \times d}", r"|\phi| = n\, d"],
                      "n trainable embeddings in front of the input: the model is untouched, only what it reads changes."),
    "Full fine-tuning": ([r"\theta \leftarrow \theta - \eta\, \nabla_\theta \mathcal{L}(\theta)", r"|\phi| = |\theta|"],
                         "Every weight trains: a whole new model per task."),
}


def block_dot(method, config):
    """A Graphviz diagram of one transformer block with `method`'s phi in orange."""
    full = method == "Full fine-tuning"
    lines = ['digraph { rankdir=TB; bgcolor="transparent"; nodesep=0.15; ranksep=0.2;',
             'node [shape=box, style="rounded,filled", fillcolor="#e3f2fd", color="#1565c0", fontname="sans-serif", '
             'fontsize=10, margin="0.06,0.03", height=0.2, width=0.2];',  # Streamlit's CSS draws svg text at ~10px
             'edge [penwidth=1.5, arrowsize=0.7, fontname="sans-serif", fontsize=10];']
    for node, label in BLOCK:
        shape = ', shape=circle' if label == "+" else ""
        lines.append(f'{node} [label="{label}"{shape}{", " + PHI if full and node not in ("x", "out", "add1", "add2") else ""}];')
    path = [node for node, _ in BLOCK]
    skip = set()
    if method == "Adapter":  # after each sublayer, before the residual add
        lines += [f'ad1 [label="adapter\\nd→{config.bottleneck_size}→d", {PHI}];',
                  f'ad2 [label="adapter\\nd→{config.bottleneck_size}→d", {PHI}];',
                  "o -> ad1 -> add1; down -> ad2 -> add2;"]
        skip = {("o", "add1"), ("down", "add2")}
    for a, b in zip(path, path[1:]):
        if (a, b) not in skip:
            lines.append(f"{a} -> {b};")
    lines.append('k [label="k"' + (", " + PHI if full else "") + '];  v [label="v"' + (", " + PHI if full else "") + '];')
    lines.append("ln1 -> k -> attn; ln1 -> v -> attn;")  # q, k and v side by side
    lines.append('x -> add1 [style=dashed, label=" residual"]; add1 -> add2 [style=dashed, label=" residual"];')
    if method == "LoRA":
        for t in config.target_modules:
            before, after = LORA_AROUND[t]
            lines.append(f'lora_{t} [label="B A ({t})\\nr = {config.r}", {PHI}];')
            lines.append(f'{before} -> lora_{t} [color="#e65100"]; lora_{t} -> {after} [color="#e65100"];')
    if method == "Prompt tuning":
        lines.append(f'P [label="P: {config.num_virtual_tokens} virtual tokens", {PHI}];')
        lines.append('P -> x [color="#e65100", label="prepended"];')
    lines.append("}")
    return "\n".join(lines)


def methods_section(facts):
    st.header("Where phi plugs in")
    tabs = st.tabs(list(PRESETS))
    for tab, (method, preset) in zip(tabs, PRESETS.items()):
        with tab:
            formulas, words = MATH[method]
            diagram, text = st.columns([1, 1.3], gap="large")
            diagram.graphviz_chart(block_dot(method, preset.config), width="stretch")
            with text:
                for formula in formulas:
                    st.latex(formula)
                n = preset.config.num_params(facts["config"]) or facts["params"]
                st.markdown(f"{words}\n\nThe preset here, `{preset.config}`, trains **{n:,}** parameters: "
                            f"**{100 * n / facts['params']:.3g}%** of the base's {facts['params']:,}. "
                            "In the diagram, orange is phi (trained), blue is the frozen base.")


def spectrum_section(facts):
    st.header("The update is small")
    st.markdown(
        "LoRA bets that the change fine-tuning makes to a weight matrix, Delta W, lives in a few directions. "
        "Check it: fine-tune **every** weight for a short budget, subtract the base, and look at the singular "
        "values of Delta W. A random matrix of the same size spreads its energy evenly; a low-rank one puts "
        "most of it in its first few directions.")
    preset = PRESETS["Full fine-tuning"]
    a, b, c = st.columns([2, 2, 1], vertical_alignment="bottom")
    task = a.selectbox("Task", list(peftcore.TASKS), key="spectrum_task")
    steps = b.slider("Steps of full fine-tuning", 20, 300, 100, 10, key="spectrum_steps",
                     help=f"learning rate {preset.train['lr']:g}, batch {preset.train['batch_size']}")
    runs = ui.group_runs("spectrum")
    if c.button("Fine-tune fully", key="spectrum_go", disabled=any(not r.finished for r in runs), width="stretch"):
        start("spectrum", [("Full fine-tuning", preset.config, {})], task, **{**preset.train, "steps": steps})
    ui.live_runs("spectrum")
    runs = ui.group_runs("spectrum")
    if runs and all(r.finished for r in runs) and runs[0].status != "failed":
        show_spectrum(runs[0])


def show_spectrum(run):
    r = PRESETS["LoRA"].config.r
    deltas = ui.run_cache(run, "deltas", lambda: analysis.delta_weights(run.model, ui.get_base(ui.device())))
    summary = ui.run_cache(run, f"summary-{r}", lambda: analysis.spectrum_summary(deltas, r))
    names = [row["projection"] for row in summary]
    name = st.selectbox("Projection", names, key="spectrum_proj",
                        help="Sorted by the size of their update, largest first.")
    sp = ui.run_cache(run, f"spectrum-{name}", lambda: analysis.spectrum(deltas[name]))
    k = list(range(1, len(sp["s"]) + 1))
    traces = [dict(type="scatter", mode="lines", name="Delta W after full fine-tuning", x=k,
                   y=[100 * e for e in sp["energy"]], line=dict(width=5, color=ui.COLORS["Full fine-tuning"])),
              dict(type="scatter", mode="lines", name="random matrix, same size and norm", x=k,
                   y=[100 * e for e in sp["random_energy"]], line=dict(width=3, color="#999999", dash="dot")),
              dict(type="scatter", mode="markers+text", name=f"LoRA preset rank r = {r}", x=[r],
                   y=[100 * sp["energy"][r - 1]], text=[f"r = {r}: {100 * sp['energy'][r - 1]:.0f}%"],
                   textposition="middle right", textfont=dict(size=18),
                   marker=dict(size=16, color=ui.COLORS["LoRA"], symbol="diamond"))]
    left, right = st.columns([2, 1], gap="large")
    with left:
        st.markdown(f"`{name}`: share of ‖Delta W‖² in the top k singular directions")
        # the legend above the plot, one entry per line: inside it covered the random curve
        ui.plot(ui.figure(traces, height=520, margin=dict(l=70, r=30, t=120, b=60),
                          legend=dict(orientation="v", x=0, y=1.02, yanchor="bottom", font=ui.FONT),
                          xaxis=dict(title="k (rank)", type="log"), yaxis=dict(title="% of energy", range=[0, 102])),
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


def pretraining_section():
    st.header("Pretraining matters")
    st.markdown(
        "PEFT steers what the base already knows. Train the same phi, with the same budget and seed, on the "
        "pretrained base and on a **randomly initialised** frozen base of the same shape.")
    a, b, c, d = st.columns([2, 2, 2, 1], vertical_alignment="bottom")
    task = a.selectbox("Task", list(peftcore.TASKS), key="pretrain_task")
    method = b.selectbox("Method", PEFT_METHODS, key="pretrain_method")
    preset = PRESETS[method]
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


def start(group, jobs, task, **train_kwargs):
    error = ui.start_group(group, jobs, task, url=True, seed=ui.seed(), device=ui.device(), **train_kwargs)
    if error:
        st.error(error)
    else:
        st.rerun()


st.title("Inside: why it works")
st.markdown(
    "Three ways to add a small trainable **phi** to a frozen transformer, what each one computes, and two "
    "experiments you can run here: how small the change of a full fine-tune really is, and what PEFT can "
    "do without a pretrained base.")
facts = ui.base_facts(ui.device())
for section, what in [(lambda: methods_section(facts), "The methods"), (lambda: spectrum_section(facts), "The spectrum"),
                      (pretraining_section, "The pretraining experiment")]:
    with ui.panel(what):
        section()
