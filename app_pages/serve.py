"""Many tasks at once: the session's bank of phi over one shared base, uploads, and serving
rows for different tasks in one mixed batch."""
import re
from pathlib import Path

import streamlit as st

import peftcore
import ui
from peftcore import analysis
from peftcore.storage import human_bytes

MAX_ROWS = 64
ss = st.session_state


def bank_table(rows, facts):
    """Every phi: method, task, size, and its file measured against the closed form."""
    st.dataframe([dict(name=r["name"], method=r["method"], task=r["task"], params=r["params"],
                       phi_pct=r["phi_pct"], file=r["file_bytes"], formula=r["formula_bytes"],
                       overhead=r["file_bytes"] - r["formula_bytes"]) for r in rows],
                 hide_index=True, column_config={
                     "params": st.column_config.NumberColumn("parameters", format="localized"),
                     "phi_pct": st.column_config.NumberColumn("phi %", format="%.3f%%"),
                     "file": st.column_config.NumberColumn("file bytes (measured)", format="localized"),
                     "formula": st.column_config.NumberColumn(
                         "formula bytes", format="localized", help="closed-form parameter count x bytes per parameter"),
                     "overhead": st.column_config.NumberColumn(
                         "header bytes", format="localized", help="file minus formula: names, shapes and config")})
    total = facts["file_bytes"] + sum(r["file_bytes"] for r in rows)
    full = len(rows) * facts["file_bytes"]
    st.markdown(f"**{len(rows)} tasks** stored as one base ({human_bytes(facts['file_bytes'])}) plus their phi: "
                f"**{human_bytes(total)}**, {total / facts['file_bytes']:.3f} base models. "
                f"A full fine-tuned copy per task would take {human_bytes(full)} ({len(rows)} base models).")


def remove_widget(names):
    a, b = st.columns([3, 1], vertical_alignment="bottom")
    name = a.selectbox("Remove a phi", names, key="remove_name", help="Only from your session's bank.")
    if b.button("Remove", key="remove", width="stretch", disabled=not names):
        ui.remove_from_bank(name)
        st.rerun()


def upload_widget():
    """Load an uploaded phi file once; a bad file gets a clear error and changes nothing."""
    f = st.file_uploader("Upload a phi file (.safetensors)", type=["safetensors"], key="upload",
                         help="A file downloaded from *Train a sliver*. It is checked before anything is loaded: "
                              "format, config, base fingerprint, tensor names, shapes and values.")
    if f is not None and f.file_id != ss.get("upload_done"):
        ss["upload_done"] = f.file_id  # reruns keep the widget's file; load it only once
        stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(f.name).stem)[:60] or "uploaded"
        name = ui.unique_name(stem)
        try:
            ui.add_to_bank(name, f.getvalue())
            ss["upload_msg"] = ("success", f"Loaded **{name}** ({f.size:,} bytes) into your bank.")
        except peftcore.AdapterLoadError as e:
            ss["upload_msg"] = ("error", f"{f.name} was not loaded: {e}")
    if f is not None and "upload_msg" in ss:
        kind, text = ss["upload_msg"]
        (st.success if kind == "success" else st.error)(text)


def default_serving(rows):
    """One phi per task, preferring LoRA: a mixed batch with every task in it."""
    chosen = {}
    for r in sorted(rows, key=lambda r: r["method"] != "LoRA"):
        chosen.setdefault(r["task"], r["name"])
    return list(chosen.values())


def serve_panel(rows):
    servable = [r for r in rows if r["task"] in peftcore.TASKS]
    task_of = {r["name"]: r["task"] for r in servable}
    if "serve_names" in ss:  # a removed phi leaves the selection
        ss["serve_names"] = [n for n in ss["serve_names"] if n in task_of]
    else:
        ss["serve_names"] = default_serving(servable)
    names = st.multiselect("phi to serve", list(task_of), key="serve_names",
                           format_func=lambda n: f"{n} ({task_of[n]})",
                           help="Each row of the batch gets one of these, with an input of its task.")
    a, b = st.columns(2)
    per = a.slider("Requests per phi", 1, 8, 2, key="serve_rows", help=f"At most {MAX_ROWS} rows in all.")
    digits = b.text_input("Input digits (optional)", key="serve_digits", max_chars=16, placeholder="e.g. 12345678",
                          help="Eight digits for every row; empty draws random inputs (seeded).")
    if not st.button("Serve as one mixed batch", key="serve_go", type="primary", disabled=not names):
        return
    if len(names) * per > MAX_ROWS:
        st.error(f"{len(names) * per} rows is over the limit of {MAX_ROWS}: fewer phi or fewer requests per phi.")
        return
    try:
        fixed = analysis.parse_digits(digits) if digits.strip() else None
    except ValueError as e:
        st.error(f"Input digits: {e}")
        return
    ss["served"] = analysis.serve_report(ui.bank(), names, [task_of[n] for n in names], per, fixed, ui.seed(),
                                         repeats=5)


def served_results():
    served = ss.get("served")
    if not served:
        return
    t = served["times"]
    a, b, c = st.columns(3)
    a.metric("one mixed batch", f"{1000 * t['mixed_s']:.1f} ms", help="every row with its own phi, in one pass per digit")
    b.metric("swap per request", f"{1000 * t['swap_s']:.1f} ms", help="set_adapter, then one request at a time")
    ratio = t["swap_s"] / t["mixed_s"]
    c.metric("mixed batch against swapping", f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower",
             help="With few rows or one phi, routing rows costs more than it saves; it pays off with many tasks.")
    st.caption(f"Median of 5 timings each, greedy decoding of 8 digits, alternating the two on {ui.device()}. "
               f"Outputs of the mixed batch {'equal' if served['same'] else 'DIFFER FROM'} one-request-at-a-time outputs.")
    ui.predictions_table(served["rows"])


def swap_panel(rows):
    st.subheader("What a task swap costs")
    names = [r["name"] for r in rows]
    name = st.selectbox("phi", names, key="swap_name", help="Switch to it while resident, or load it from its file.")
    if name and st.button("Time a swap", key="swap_time"):
        data = peftcore.adapter_to_bytes(ui.bank(), name)
        t = analysis.swap_timings(ui.bank(), name, data)
        a, b, c = st.columns(3)
        a.metric("set_adapter (resident)", f"{1e6 * t['set_adapter_s']:.0f} µs", help="moves no bytes: a pointer")
        b.metric("load from its file", f"{1000 * t['load_s']:.1f} ms", help="parse, check and copy the tensors")
        c.metric("bytes the load moves", human_bytes(len(data)))


def merge_panel(rows):
    st.subheader("LoRA: merge W + BA, or keep it beside W")
    loras = [r["name"] for r in rows if r["method"] == "LoRA" and r["task"] in peftcore.TASKS]
    if not loras:
        st.info("No LoRA phi in your bank.")
        return
    name = st.selectbox("LoRA phi", loras, key="merge_name")
    merged = st.toggle("Merge into the weights", key="merge_on",
                       help="One matmul per projection instead of two, but that copy of W serves this task only.")
    key = f"merge_times:{name}:{id(ui.bank().peft_config[name])}"  # a re-added name is a new phi
    again = st.button("Measure again", key="merge_again", help="Timings on a shared machine vary; measure twice.")
    if again or key not in ss:
        prompts, _ = analysis.make_prompts(ui.bank().adapter_task[name], n=32, seed=ui.seed())
        ss[key] = analysis.merged_vs_unmerged(ui.bank(), name, prompts)
    t = ss[key]
    mine, other = ("merged_s", "unmerged_s") if merged else ("unmerged_s", "merged_s")
    st.metric(f"latency, batch of 32, {'merged' if merged else 'unmerged'}", f"{1000 * t[mine]:.2f} ms",
              delta=f"{1000 * (t[mine] - t[other]):+.2f} ms vs {'unmerged' if merged else 'merged'}",
              delta_color="inverse")
    st.caption(f"Largest difference in the logits between the two: {t['max_abs_diff']:.1e} (float rounding). "
               "A merged model serves one task per copy of W; unmerged, one W serves every phi in a mixed batch.")


st.title("Many tasks at once")
st.markdown(
    "One frozen base stays in memory; every task is a small **phi** beside it. Your bank starts with the "
    "library shipped with the app (one trained phi per method and task) plus whatever you save or upload. "
    "Serving mixes tasks in one batch: each row is routed through its own phi in the same forward pass.")

facts = ui.base_facts(ui.device())
model = ui.bank()
for error in ss.get("library_errors", []):
    st.warning(f"A library phi was skipped: {error}")
rows = ui.bank_rows()

st.subheader("Your bank")
if rows:
    bank_table(rows, facts)
    remove_widget([r["name"] for r in rows])
else:
    st.info("Your bank is empty: the library is not there yet. Save a phi on *Train a sliver* or upload one.")
upload_widget()
rows = ui.bank_rows()

st.subheader("Serve a mixed batch")
if rows:
    serve_panel(rows)
    served_results()
    left, right = st.columns(2, gap="large")
    with left:
        swap_panel(rows)
    with right:
        merge_panel(rows)
else:
    st.info("Nothing to serve yet.")
