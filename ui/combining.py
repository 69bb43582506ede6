"""Many phi become one (PeftModel.add_weighted_adapter), as the Serve page and a class's teacher
ask for it: the controls under HF peft's names, the weights, and what a combination measured
(peftcore.analysis.merge_report and svd_curve) in tables, sentences and a chart."""
import pandas as pd
import streamlit as st

import peftcore
from peftcore import merging
from peftcore.storage import human_bytes

from .charts import PEFT_COLOR, figure, plot
from .text import literal

WEIGHTINGS = {"mean": "1/N each: the mean of the updates", "sum": "1 each: their sum (task arithmetic)",
              "own": "my own, one per phi"}
TASK_DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
TASK_MARKERS = ("circle", "square", "diamond", "triangle-up", "x")
WHY = {  # what each combination_type computes, in a sentence (peftcore.merging says it in full)
    "svd": "the exact weighted sum of the updates, cut to its best rank-svd_rank approximation",
    "cat": "the exact weighted sum of the updates: the factors stacked, so the ranks add up",
    "linear": "A and B summed factor by factor (HF peft's): not the sum of the updates (the cross terms are "
              "measured once merged)",
    "ties": "each factor's largest entries, a sign elected per entry, the agreeing entries averaged",
    "magnitude_prune": "each factor's largest entries (density of them), then summed",
    "dare_linear": "each factor's entries dropped at random (1 - density of them), the rest rescaled, then summed",
    "dare_ties": "DARE's random drops, then TIES's sign election",
}


def combinable(peft_types):
    """The methods among `peft_types` whose phi combine, in the registry's order."""
    present = set(peft_types)
    return [t for t, m in peftcore.METHODS.items() if m.combinations and t in present]


def why(kind):
    """A line on what `kind` computes; the *_svd forms prune the sources' updates, not their factors."""
    base = kind.removesuffix("_svd")
    if kind == base:
        return WHY[kind]
    return WHY[base].replace("factor", "source's update") + ", then cut to rank svd_rank by an SVD"


def parse_weights(text, n):
    """'0.7, 0.3' -> [0.7, 0.3]: one number per phi, or ValueError saying what is wrong."""
    parts = [p for p in str(text).replace(";", ",").split(",") if p.strip()]
    if len(parts) != n:
        raise ValueError(f"give one weight per phi: {n} phi, {len(parts)} weight{'s' * (len(parts) != 1)}")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"weights are numbers such as 0.7, got {literal(text, 40)}") from None
    if not all(abs(w) < 1e6 for w in weights):  # inf and nan fail this too
        raise ValueError("each weight must be a finite number below a million in size")
    return weights


def controls(key, method, n, typed=True):
    """add_weighted_adapter's options for `n` phi of `method`, chosen under HF peft's names:
    (options, weighting, weights); `typed`: weights may be typed one by one. Raises ValueError
    for weights typed wrong."""
    a, b, c = st.columns(3)
    kind = a.selectbox("combination_type", method.combinations, key=f"{key}_type",
                       format_func=lambda k: k + (" (peft's default)" if k == "svd" else ""),
                       help="How the phi become one; each is HF peft's add_weighted_adapter option of that name.")
    a.caption(why(kind))
    weighting = b.selectbox("weights", [w for w in WEIGHTINGS if typed or w != "own"], key=f"{key}_weighting",
                            format_func=WEIGHTINGS.get,
                            help="One weight per phi, in the order chosen.")
    options, form = dict(combination_type=kind), merging.MergeOptions(combination_type=kind)
    weights = equal_weights(weighting, n)
    if weighting == "own":
        text = b.text_input("Your weights", key=f"{key}_weights", max_chars=200, placeholder="e.g. 0.7, 0.3",
                            help="Numbers, comma-separated, one per phi in the order chosen.")
        weights = parse_weights(text, n) if text.strip() else equal_weights("mean", n)
    if form.base_kind in merging.PRUNING:
        options["density"] = c.slider("density", 0.1, 1.0, 0.5, 0.1, key=f"{key}_density",
                                      help="The fraction of each tensor's entries kept.")
    if form.truncates:
        options["svd_rank"] = c.number_input("svd_rank", 1, 64, None, key=f"{key}_rank", placeholder="largest source r",
                                             help="The merged phi's rank. Empty: the largest rank among the "
                                                  "sources (peft's default).")
    return options, weighting, weights


def equal_weights(weighting, n):
    """n weights of 1/n ("mean") or 1 ("sum"); None for "own" (typed)."""
    return None if weighting == "own" else [1 / max(n, 1) if weighting == "mean" else 1.0] * n


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def task_table(report, own=None):
    """One row per task: what the merged phi reaches, beside what the sources reach on their own
    (own: {task: text}, else the sources' own scores) and the exact weighted sum where measured."""
    exact_sum = report.get("exact_sum")
    sources = {}
    for name, score in report["sources"].items():
        sources.setdefault(report["source_tasks"][name], []).append(f"{name} {pct(score)}")
    rows = []
    for task in report["tasks"]:
        row = {"task": task, "the merged phi": pct(report["merged"][task]),
               "each source on its own task": (own or {}).get(task) or ", ".join(sources.get(task, ())) or "-"}
        if exact_sum:
            row["the exact weighted sum (cat)"] = pct(exact_sum["merged"][task])
        rows.append(row)
    st.table(pd.DataFrame(rows), hide_index=True)
    st.caption("Held-out exact match (all 8 answer digits right) on each task's fixed held-out set, every row "
               "of every task and phi in one mixed batch.")


KEPT_WITHIN = 0.05  # a task is kept when the merged phi is within 5 points of its best source there


def verdict(report):
    """What the merge kept, task by task, against the sources on their own tasks (a sentence)."""
    best = {}
    for name, score in report["sources"].items():
        task = report["source_tasks"][name]
        best[task] = max(best.get(task, 0.0), score)
    if not best:
        return ""
    kept = [t for t in best if report["merged"].get(t, 0.0) >= best[t] - KEPT_WITHIN]
    line = (f"**It keeps {len(kept)} of {len(best)} task{'s' * (len(best) != 1)}**"
            + (f" ({', '.join(kept)})" if kept else "")
            + f": within {100 * KEPT_WITHIN:.0f} points of the best source on that task.")
    if len(best) > 1 and len(kept) < len(best):
        line += (" Phi of different tasks pull the same weights different ways, and every task's input looks "
                 "alike (eight digits), so one merged phi cannot tell which map to apply. Phi trained on the "
                 "same task (a class's students) merge into one that keeps it: try two of one task.")
    return line


def size_line(report):
    n, sources = len(report["source_params"]), report["source_params"].values()
    return (f"The merged phi: **{report['params']:,} parameters**, a file of {human_bytes(len(report['file']))}; "
            f"the {n} source{'s' * (n != 1)}: {sum(sources):,} parameters together. "
            + ("One file serves where there were " + str(n) + "." if n > 1 else ""))


def cross_terms_note(report):
    """Why peft's linear is not an average of the updates, with this merge's own norms."""
    gap = report.get("exact_sum")
    if not gap:
        return
    st.markdown(
        f"**Why `{report['combination_type']}` is not an average of the updates.** HF peft combines the factors "
        "one by one, B = Σ √wᵢ Bᵢ and A = Σ √wᵢ Aᵢ (each scaled too), so the update B A = Σ wᵢ Bᵢ Aᵢ "
        "**plus the cross terms** √(wᵢ wⱼ) Bᵢ Aⱼ of every pair. Measured here: the exact weighted sum of "
        f"the updates has norm {gap['norm']:.3g}; the merged phi's update has norm {gap['merged_norm']:.3g} and "
        f"differs from it by {gap['gap']:.3g} ({100 * gap['gap'] / max(gap['norm'], 1e-12):.0f}% of it): that "
        "difference is the cross terms. Two copies of one phi at weights ½ each come back twice as "
        "large, not as themselves. `cat` (or `svd` at a high enough rank) gives the exact sum.")


def svd_chart(curve, rank_used, key):
    """What each svd_rank keeps: the energy of the exact sum and each task's exact match."""
    ranks = [row["rank"] for row in curve]
    tasks = list(curve[0]["exact"]) if curve else []
    traces = [dict(type="scatter", mode="lines+markers", name="energy kept (of the exact sum)", x=ranks,
                   y=[100 * row["energy"] for row in curve], line=dict(width=5, color=PEFT_COLOR),
                   marker=dict(size=10, symbol="star"),
                   hovertemplate="rank %{x}: %{y:.1f}% of the energy<extra></extra>")]
    for i, task in enumerate(tasks):
        traces.append(dict(type="scatter", mode="lines+markers", name=f"exact match: {task}", x=ranks,
                           y=[100 * row["exact"][task] for row in curve],
                           line=dict(width=3, color="#333333", dash=TASK_DASHES[i % len(TASK_DASHES)]),
                           marker=dict(size=9, symbol=TASK_MARKERS[i % len(TASK_MARKERS)]),
                           hovertemplate=f"rank %{{x}}: %{{y:.1f}}% exact on {task}<extra></extra>"))
    fig = figure(traces, height=420, xaxis=dict(title="svd_rank of the merged phi", dtick=1),
                 yaxis=dict(title="percent", range=[0, 105]))
    last = curve[-1] if curve else None
    summary = ("Ranks 1 to " + str(ranks[-1]) + ": energy kept " + ", ".join(f"{100 * r['energy']:.0f}%" for r in curve)
               + ". Exact match at rank " + str(last["rank"]) + ": "
               + ", ".join(f"{t} {pct(last['exact'][t])}" for t in tasks)
               + f" (first 128 held-out rows of each task). The merge above used {rank_used}.") if curve else ""
    plot(fig, summary, key=key)
