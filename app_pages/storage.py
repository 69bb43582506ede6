"""One base, many tasks: what storing T fine-tuned tasks costs, PEFT against full fine-tuning."""
import math

import numpy as np
import streamlit as st

import ui
from peftcore.presets import PRESETS
from peftcore.storage import (KNOWN_BASES, break_even, full_storage, human_bytes, peft_storage, phi_that_fit,
                              toy_lora_qv_bytes)

# phi as a percentage of the base: a 1-1.5-2-3-5-7 ladder per decade, fine at the low end.
P_OPTIONS = sorted({float(round(m * 10 ** e, 4)) for e in range(-2, 2) for m in (1, 1.5, 2, 3, 5, 7)} | {100.0})
T_OPTIONS = [10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
P_DEFAULT, T_DEFAULT = 1.0, 100
GPU_GB = [8, 16, 24, 40, 48, 80, 141, 192]
TOY = "Toy base (its file on disk)"
N_POINTS = 200


def pct(p):
    return f"{p:g}%"


def task_axis(t_max, log):
    """The x values: whole numbers of tasks, evenly spread on the chosen axis."""
    x = np.geomspace(1, t_max, N_POINTS) if log else np.linspace(0, t_max, min(t_max + 1, N_POINTS))
    return np.unique(np.round(x)).astype(int)


def storage_figure(p, t_max, log, scale, unit, measured):
    """The signature chart: bold PEFT 1 + T p, faint full fine-tuning T, break-even and saving.
    `scale` converts base models to the chosen unit (1, or bytes per base)."""
    x = task_axis(t_max, log)
    peft, full = peft_storage(x, p) * scale, full_storage(x) * scale
    fmt = "%{y:.4g} base models" if scale == 1 else "%{y:.3s}B"
    traces = [
        dict(type="scatter", mode="lines", name=f"PEFT: 1 + T·p  (p = {pct(100 * p)})", x=x.tolist(), y=peft.tolist(),
             line=dict(width=6, color=ui.PEFT_COLOR), hovertemplate=f"PEFT: {fmt}<extra></extra>", legendrank=1),
        dict(type="scatter", mode="lines", name="full fine-tuning: T", x=x.tolist(), y=full.tolist(), legendrank=2,
             line=dict(width=4, color="#888888"), opacity=0.45,
             hovertemplate=f"full fine-tuning: {fmt}<extra></extra>"),
    ]
    if measured:  # the first t_max of them: the chart ends at T = t_max
        k = np.arange(1, len(measured) + 1)[:t_max]
        y = (1 + np.cumsum(measured))[:t_max] * scale
        # under the PEFT line (first in the data, third in the legend) and small: the library's 25
        # circles drawn on top hid the start of the line they measure
        traces.insert(0, dict(type="scatter", mode="markers", name="measured: your bank's phi files", legendrank=3,
                              x=k.tolist(), y=y.tolist(), marker=dict(size=9, color="#ff7f0e", symbol="circle-open",
                                                                      line=dict(width=2)),
                              hovertemplate=f"measured, %{{x}} phi files: {fmt}<extra></extra>"))
    marks, notes = marks_for(p, t_max, log, scale)
    traces += marks  # drawn last: the break-even marker stays above the measured ones
    axis_type = "log" if log else "linear"
    yaxis = dict(title="storage (base models)", type=axis_type)
    if scale != 1:
        yaxis.update(title=f"storage (bytes, {unit})", **byte_ticks(scale, float(full.max()), log))
    xaxis = dict(title="number of tasks T", type=axis_type, hoverformat=",d")
    if log:  # a little room past 1 and t_max: plotly hides a tick label that touches the plot's edge
        pad = 0.03 * math.log10(t_max)
        xaxis["range"] = [-pad, math.log10(t_max) + pad]
    return ui.figure(traces, height=560, hovermode="x unified", annotations=notes, xaxis=xaxis, yaxis=yaxis)


def byte_ticks(low, high, log):
    """Readable byte ticks (1 GB, 10 GB...): powers of ten on a log axis, SI format otherwise."""
    if not log:
        return dict(tickformat="~s", ticksuffix="B")
    powers = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    return dict(tickvals=[10.0 ** k for k in powers], ticktext=[human_bytes(10 ** k).replace(".0 ", " ") for k in powers])


def marks_for(p, t_max, log, scale):
    """The break-even point and the saving at the largest T: (traces, arrow annotations).
    Annotations on a log axis take log10 coordinates (plotly's rule)."""
    pos = (lambda v: math.log10(v)) if log else (lambda v: v)
    traces, notes = [], []
    t_star = break_even(p)
    if t_star <= t_max:
        traces.append(dict(type="scatter", mode="markers", x=[t_star], y=[t_star * scale], showlegend=False,
                           marker=dict(size=16, color="#d62728", symbol="diamond"),
                           hovertemplate=f"break-even: T = {t_star_text(t_star)}<extra></extra>"))
        notes.append(dict(x=pos(t_star), y=pos(t_star * scale), ax=70, ay=-70,
                          text=f"break-even T* = {t_star_text(t_star)}",
                          showarrow=True, arrowwidth=2, arrowcolor="#d62728", font=dict(size=18, color="#d62728"),
                          xanchor="left", bgcolor="rgba(255,255,255,0.8)"))
    top, bottom = float(full_storage(t_max)) * scale, float(peft_storage(t_max, p)) * scale
    if top > bottom:
        save = top - bottom
        amount = f"{ui.fmt_num(save / scale)} base models" if scale == 1 else human_bytes(save)
        traces.append(dict(type="scatter", mode="lines", x=[t_max, t_max], y=[bottom, top], showlegend=False,
                           line=dict(width=3, color="#d62728", dash="dot"), hoverinfo="skip"))
        middle = 10 ** ((math.log10(max(bottom, 1e-300)) + math.log10(top)) / 2) if log else (top + bottom) / 2
        notes.append(dict(x=pos(t_max), y=pos(middle), text=f"saves {amount}<br>({100 * save / top:.3g}%)",
                          showarrow=False, xanchor="right", xshift=-10, align="right",
                          font=dict(size=18, color="#d62728"), bgcolor="rgba(255,255,255,0.8)"))
    return traces, notes


def t_star_text(t_star):
    """T* with the digits that tell it from 1: p = 0.01% gives 1.0001, not 1."""
    return "∞" if math.isinf(t_star) else ui.fmt_num(t_star, near=1)


def sentence(p, t_max, scale):
    """One plain sentence that follows the sliders."""
    peft, full = float(peft_storage(t_max, p)), float(full_storage(t_max))
    if scale == 1:
        amounts = f"PEFT stores {ui.fmt_num(peft)} base models; full fine-tuning stores {ui.fmt_num(full)}."
    else:
        amounts = f"PEFT stores {human_bytes(peft * scale)}; full fine-tuning stores {human_bytes(full * scale)}."
    return f"With {t_max:,} tasks at {pct(100 * p)}, {amounts}"


def chart_summary(p, t_max, scale):
    """The storage chart in words, with its end points and where the lines cross."""
    def amount(models):
        return f"{ui.fmt_num(models)} base models" if scale == 1 else human_bytes(models * scale)
    t_star = break_even(p)
    cross = ("the lines never cross: a phi as big as the base saves nothing" if math.isinf(t_star) else
             f"PEFT stores less from T = {math.floor(t_star) + 1:,} tasks on (T* = {t_star_text(t_star)})")
    return (f"Chart: storage against the number of tasks T, from 0 to {t_max:,}. PEFT (1 + T·p) ends at "
            f"{amount(float(peft_storage(t_max, p)))}, full fine-tuning (T) at {amount(float(full_storage(t_max)))}; "
            f"{cross}.")


def tex_int(n):
    return f"{n:,}".replace(",", "{,}")  # a comma in LaTeX math gets a space after it


def formulas(p, t_max, scale):
    """The three formulas with this chart's numbers, side by side, each as wide as it needs
    (a row that wraps where the page is narrow: KaTeX never clips or scrolls)."""
    t_star = break_even(p)
    value = r"\infty" if math.isinf(t_star) else t_star_text(t_star)
    with st.container(horizontal=True, gap="large", key="formulas"):
        st.latex(rf"\begin{{aligned}} \text{{PEFT}} &= 1 + T\,p \\ &= 1 + {tex_int(t_max)} \times {p:g} \\ "
                 rf"&= {ui.fmt_num(float(peft_storage(t_max, p)))} \end{{aligned}} \,", width="content")
        # (the thin space covers a 2 px strut KaTeX hangs past an aligned block, which would scroll)
        st.latex(rf"\text{{full fine-tuning}} = T = {tex_int(t_max)}", width="content")
        st.latex(rf"T^{{*}} = \frac{{1}}{{1 - p}} = {value}", width="content")
    unit = "one base model" if scale == 1 else f"one base model, here {human_bytes(scale)}"
    st.caption(f"In units of {unit}. Below T*, PEFT stores slightly more: the shared base "
               "plus one sliver is more than one fine-tuned copy.")


# The sliders and the toggle live in the URL. A value there that is not one of theirs
# (?p=abc, ?T=-5) is dropped by Streamlit without a word; the page says so instead.
# key: (what it is, the values it takes as the URL spells them, what they read as, default)
# A slider takes its steps only, so the message lists them: "0.01% to 100%" would not say why 0.3% is refused.
LINKED = {"p": ("the phi size slider", [pct(v) for v in P_OPTIONS], "only its steps: " + ", ".join(map(pct, P_OPTIONS)),
                pct(P_DEFAULT)),
          "T": ("the number of tasks slider", [str(t) for t in T_OPTIONS], "only its steps: " + ", ".join(map(str, T_OPTIONS)),
                f"{T_DEFAULT:,}"),
          "log": ("the log axes toggle", ["true", "false"], "true or false", "off"),
          "unit": ("the y unit", ["base models", "bytes"], "base models or bytes", "base models"),
          "base_size": ("Price it for", [TOY, *KNOWN_BASES], ", ".join([TOY, *KNOWN_BASES]), TOY),
          "gpu_gb": ("the GPU memory slider", [f"{g} GB" for g in GPU_GB], ", ".join(f"{g} GB" for g in GPU_GB), "80 GB")}


def bad_link_values(params):
    """[(key, value)] for each linked value in `params` that its widget will not take."""
    bad = []
    for key, (_, allowed, _, _) in LINKED.items():
        for value in params.get_all(key):
            if (value.lower() if key == "log" else value) not in allowed:
                bad.append((key, value))
                break
    return bad


def report_bad_link(bad):
    """A short message per refused link value: what it was and what it was reset to."""
    for key, value in bad:
        what, allowed, takes, default = LINKED[key]
        if f"{value}%" in allowed:  # ?p=0.3: the step is there, the % sign is not
            takes = f"write it as the slider shows it, with a % sign: {key}={value}%25 in a link"
        st.toast(f"The link's {key}={ui.link_value(value)} is not a value {what} takes ({takes}): reset to {default}.",
                 icon=":material/link_off:", duration="long")


def base_choice(facts):
    """(name, bytes of one base) for the unit selector."""
    names = [TOY] + list(KNOWN_BASES)
    name = st.selectbox("Price it for", names, key="base_size", bind="query-params",
                        help="The toy base is measured (its safetensors file); the others are public parameter "
                             "counts at 16 bits per parameter.")
    return name, facts["file_bytes"] if name == TOY else KNOWN_BASES[name].bytes


def measured_fractions(facts):
    """Each bank phi's measured file size over the base file's size, in bank order."""
    return [row["file_bytes"] / facts["file_bytes"] for row in ui.bank_rows()]


def presets_table(facts):
    """LoRA r=4 on q and v for the toy base and the well-known sizes: bytes per task and p."""
    toy_lora = toy_lora_qv_bytes(facts["config"])  # float32
    rows = [{"base model": "Toy base (float32, measured file)", "one base": human_bytes(facts["file_bytes"]),
             "LoRA r=4 on q, v": human_bytes(toy_lora), "p": f"{100 * toy_lora / facts['file_bytes']:.3g}%"}]
    for b in KNOWN_BASES.values():
        lora = b.lora_qv_bytes(4)
        rows.append({"base model": f"{b.name} (16-bit)", "one base": human_bytes(b.bytes),
                     "LoRA r=4 on q, v": human_bytes(lora), "p": f"{100 * lora / b.bytes:.3g}%"})
    # A static table, not a data grid: its cells wrap to the column, so no column hides
    # behind a scrollbar on a projector.
    st.table(rows, hide_index=True)
    view = ui.low_rank_view()
    lora = PRESETS[view.peft_type].config
    preset = 4 * lora.num_params(facts["config"])  # float32, as the toy's row
    st.caption("LoRA r=4 on q, v: one task's phi, rank 4 on the q and v projections of every layer, a common "
               f"setting on real models. The Train page's {view.name} preset differs: r={view.rank(lora)} on "
               f"{', '.join(lora.target_modules)}, {human_bytes(preset)} on the toy base "
               f"({100 * preset / facts['file_bytes']:.3g}% of its file).")


def serving_panel(p, base_name, base_bytes):
    st.header("Serving: many phi beside one base")
    gb = st.select_slider("GPU memory", GPU_GB, value=80, format_func=lambda g: f"{g} GB", key="gpu_gb", bind="query-params",
                          help="Weights only: activations and caches need room too.")
    phi_bytes = p * base_bytes
    fit = phi_that_fit(gb * 1e9, base_bytes, phi_bytes)
    if base_bytes > gb * 1e9:
        st.warning(f"{base_name} ({human_bytes(base_bytes)}) does not fit in {gb} GB on its own.")
    # Each metric as wide as its label and value; the row wraps rather than cut "2,506,476".
    with st.container(horizontal=True, gap="medium", key="serving_metrics"):
        if base_bytes <= gb * 1e9:
            st.metric("phi fit beside the base", f"{fit:,}", help=f"({gb} GB - base) / phi bytes", width="content")
        st.metric("PEFT swap moves", human_bytes(phi_bytes), help="one phi, p times the base", width="content")
        st.metric("full FT swap moves", human_bytes(base_bytes), width="content",
                  help=f"a whole model: {ui.fmt_num(1 / p)}x more" if p > 0 else None)


st.title("One base, many tasks")
st.markdown(
    "Fine-tuning a whole model for every task stores a whole model per task. PEFT freezes the base "
    "and trains a small module **phi** per task, a fraction **p** of the base's size (often 0.1% to 1%). "
    "Storing **T** tasks then costs one shared base plus **T** slivers. Move the sliders: the link in "
    "your address bar keeps every setting on this page, so you can share this exact chart.")

facts = ui.base_facts(ui.device())
report_bad_link(bad_link_values(st.query_params))  # before the widgets: they drop what they refuse
controls, chart = st.columns([1, 2.4], gap="large")
with controls:
    p_pct = st.select_slider("phi size p (% of the base)", P_OPTIONS, value=P_DEFAULT, format_func=pct, key="p",
                             bind="query-params", help="How big one task's trainable module is, relative to the base.")
    t_max = st.select_slider("Largest number of tasks T", T_OPTIONS, value=T_DEFAULT, key="T", bind="query-params",
                             help="The right end of the chart.")
    log = st.toggle("Log axes", key="log", bind="query-params",
                    help="Shows the small-T region, where the curves cross, and large T at once.")
    unit = st.radio("y in", ["base models", "bytes"], horizontal=True, key="unit", bind="query-params",
                    help="Bytes multiply by the size of the base chosen below.")
    base_name, base_bytes = base_choice(facts)
    p = p_pct / 100
    scale = 1 if unit == "base models" else base_bytes

measured = []
if base_name == TOY:
    with ui.panel("Your bank's phi files"):
        measured = measured_fractions(facts)
with chart, ui.panel("The storage chart"):
    st.markdown(f"## {sentence(p, t_max, scale)}")  # the chart's heading: h2 under the title
    ui.plot(storage_figure(p, t_max, log, scale, base_name, measured), chart_summary(p, t_max, scale),
            key="storage_chart")
    if measured:
        shown = f"the first {t_max} of the {len(measured)}" if len(measured) > t_max else f"the {len(measured)}"
        saved = len(st.session_state.get("stored_ids", {}))
        st.caption(f"Orange circles: {shown} phi files in your bank ({len(measured) - saved} from the library "
                   f"shipped with the app, {saved} you saved), stacked on the base at their measured sizes "
                   f"({min(measured) * 100:.3g}% to {max(measured) * 100:.3g}% of the base file).")
    elif base_name == TOY:
        st.caption("No phi in this session's bank yet: train one on *Train a sliver* to see it measured here.")

with ui.panel("The formulas"):
    formulas(p, t_max, scale)

left, right = st.columns(2, gap="large")
with left, ui.panel("Serving"):
    serving_panel(p, base_name, base_bytes)
with right, ui.panel("The bytes table"):
    st.header("What one task costs, in bytes")
    presets_table(facts)
