"""Many tasks at once: the session's bank of phi over one shared base, uploads, and serving
rows for different tasks in one mixed batch."""
import json
import re
from pathlib import Path

import pandas as pd
import streamlit as st

import peftcore
import ui
from peftcore import analysis, library, presets
from peftcore.storage import human_bytes

MAX_ROWS = 64
MERGE_REPEATS = 15  # alternating pairs timed for the merge panel (as many as before: the page waits on them)
ss = st.session_state


def bank_table(rows, facts):
    """Every phi: method, task, size, and its file measured against the closed form. A static
    table (every column in view on a projector, none behind a grid's scrollbars), folded by
    default: the library alone is 25 rows, which put the mixed batch 1,700 px down the page."""
    table = pd.DataFrame([{"name": ui.as_text(r["name"], 64), "method": r["method"], "task": ui.as_text(r["task"], 64),
                           "parameters": r["params"], "phi %": r["phi_pct"], "file bytes (measured)": r["file_bytes"],
                           "formula bytes": r["formula_bytes"], "header bytes": r["file_bytes"] - r["formula_bytes"]}
                          for r in rows])
    numbers = ["parameters", "phi %", "file bytes (measured)", "formula bytes", "header bytes"]
    st.markdown(ui.storage_sentence([r["file_bytes"] for r in rows], [r["task"] for r in rows], facts["file_bytes"]))
    with st.expander(f"Every phi in your bank, file by file ({len(rows)})"):
        st.table(table.style.format("{:,}", subset=numbers[:1] + numbers[2:]).format("{:.3f}%", subset=["phi %"])
                 .set_properties(subset=numbers, **{"text-align": "right"}), hide_index=True)
        st.caption("Formula bytes: the closed-form parameter count times bytes per parameter. Header bytes: the "
                   "file minus the formula (tensor names, shapes and the config).")


# The bank changes in widget callbacks, which run before the page does: the bank table,
# its count and the serving choices drawn below already show the change in the same run.
def remove_phi():
    name = ss.get("remove_name")
    if name in ui.bank().peft_config:
        try:
            ui.remove_from_bank(name)
        except ui.StoreError as e:
            ss["remove_msg"] = f"{ui.literal(name, 64)} was not deleted: {e}."


def remove_widget(names):
    """A library phi leaves this session only; one the visitor saved is deleted for good,
    once they confirm."""
    a, b = st.columns([3, 1], vertical_alignment="bottom")
    name = a.selectbox("Remove a phi", names, key="remove_name",
                       help="A library phi leaves this session's bank only. A phi you saved is deleted from the "
                            "store for good, after you confirm.")
    if "remove_msg" in ss:
        st.error(ss.pop("remove_msg"))
    if name in ss.get("stored_ids", {}):
        with b.popover("Delete…", width="stretch"):
            st.write(f"Deletes {ui.literal(name, 64)} from the store for good: your bank link will not bring it back. "
                     "A copy you saved into a class stays in the class.")
            st.button("Yes, delete it", key="remove", type="primary", on_click=remove_phi)
    else:
        b.button("Remove", key="remove", width="stretch", disabled=not names, on_click=remove_phi,
                 help="From this session's bank only: a new session brings the shipped library back.")


def load_upload():
    """Load the file just uploaded; a bad file gets a clear error and changes nothing.
    A good one joins the phi served below, if its task is one the app can serve."""
    f = ss.get("upload")
    if f is None:
        ss.pop("upload_msg", None)
        return
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(f.name).stem)[:60] or "uploaded"
    name = ui.unique_name(stem)
    try:
        ui.add_to_bank(name, f.getvalue())
    except peftcore.AdapterLoadError as e:
        # the file's name and the reason (which may quote the file's own config) are the visitor's text
        ss["upload_msg"] = ("error", f"{ui.literal(f.name, 80)} was not loaded: {ui.plain(e, 300)}")
        return
    ss["upload_msg"] = ("success", f"Loaded {ui.literal(name, 64)} ({f.size:,} bytes) into your bank.")
    if ui.bank().adapter_task.get(name) in peftcore.TASKS and "serve_names" in ss:
        ss["serve_names"] = [*ss["serve_names"], name]


def upload_widget():
    f = st.file_uploader("Upload a phi file (.safetensors)", type=["safetensors"], key="upload", on_change=load_upload,
                         help="A file downloaded from *Train a sliver*. It is checked before anything is loaded: "
                              "format, config, base fingerprint, tensor names, shapes and values.")
    if f is not None and "upload_msg" in ss:
        kind, text = ss["upload_msg"]
        (st.success if kind == "success" else st.error)(text)


def default_serving(rows):
    """One phi per task, preferring the visitor's own (newest first), then the methods in
    the registry's order: a mixed batch with every task in it, the phi they just trained among them."""
    mine, order = list(ss.get("stored_ids", {}))[::-1], list(peftcore.METHODS)
    chosen = {}
    for r in sorted(rows, key=lambda r: (mine.index(r["name"]) if r["name"] in mine else len(mine),
                                         order.index(r["peft_type"]))):
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
    tasks = [task_of[n] for n in names]
    ss["served"] = {**analysis.serve_report(ui.bank(), names, tasks, per, fixed, ui.seed(), repeats=5), "tasks": tasks}


def served_results():
    served = ss.get("served")
    if not served:
        return
    t = served["times"]
    ui.serving_metrics(t, len(served["rows"]))
    st.caption(f"Median of 5 timings each, greedy decoding of 8 digits, alternating the two on {ui.device()}. "
               f"Outputs of the mixed batch {'equal' if served['same'] else 'DIFFER FROM'} one-request-at-a-time outputs.")
    ui.predictions_table(served["rows"])
    if "sort" in served.get("tasks", ()):
        sort_note(served["same"])


@st.cache_data
def recorded_exact():
    """{library phi name: held-out exact match it reached when it was trained} (library/index.json)."""
    try:
        index = json.loads((library.LIBRARY_DIR / "index.json").read_text())
        return {name: row["eval_exact"] for name, row in index.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def sort_note(same):
    """Why the sort rows are wrong: what was measured, from the records, never typed in."""
    recorded = recorded_exact()
    slugs = library.method_slugs()
    reached = [f"{ui.view_of(t).name} {100 * recorded[f'{slug}-sort']:.1f}%" for t, slug in slugs.items()
               if f"{slug}-sort" in recorded]
    seeds = []
    for t in slugs:
        r = presets.robustness(t, "sort")  # what the preset reaches over several seeds, where recorded
        if r:
            seeds.append(f"{ui.view_of(t).name} {r['solved']} of {r['seeds']}")
    st.info("**Why the sort rows are wrong.** No method here learns *sort* in a live training budget. Sorting is "
            "a new algorithm, not a mix of what the base learned (copying, reversing, rotating and shifting "
            "digits): each output digit depends on every input digit, and a small phi does not find that in a "
            "few hundred steps. "
            + (f"The library's sort phi reached {', '.join(reached)} held-out exact match when trained. " if reached
               else "")
            + (f"Seeds on which the presets reached {100 * presets.SOLVES_AT:.0f}% (recorded): {', '.join(seeds)}. "
               if seeds else "")
            + ("The wrong rows are that lesson, not a serving fault: one request at a time gives the same outputs."
               if same else "The wrong rows are that lesson."),
            icon=":material/info:")


def swap_panel(rows):
    st.header("What a task swap costs")
    names = [r["name"] for r in rows]
    name = st.selectbox("phi", names, key="swap_name", help="Switch to it while resident, or load it from its file.")
    if name and st.button("Time a swap", key="swap_time"):
        data = peftcore.adapter_to_bytes(ui.bank(), name)
        t = analysis.swap_timings(ui.bank(), name, data)
        with st.container(horizontal=True, gap="large"):  # each metric as wide as it needs: nothing cut off
            st.metric("set_adapter (resident)", f"{1e6 * t['set_adapter_s']:.0f} µs", width="content",
                      help="moves no bytes: a pointer")
            st.metric("load from its file", f"{1000 * t['load_s']:.1f} ms", width="content",
                      help="parse, check and copy the tensors")
            st.metric("bytes the load moves", human_bytes(len(data)), width="content")


def merge_panel(rows):
    st.header("Merge phi into W, or keep it beside W")
    mergeable = [r["name"] for r in rows if peftcore.METHODS[r["peft_type"]].mergeable and r["task"] in peftcore.TASKS]
    if not mergeable:
        st.info("No phi of a method that merges (" + ", ".join(
            v.name for v in ui.method_views() if v.method.mergeable) + ") in your bank.")
        return
    name = st.selectbox("phi that merges", mergeable, key="merge_name",
                        format_func=lambda n: f"{n} ({ui.view_of(ui.bank().peft_config[n].peft_type).name})")
    model = ui.bank()
    # Keyed on the bank's generation (it moves on every add, delete, load and merge), never on
    # id(): a phi removed and uploaded again under its name may get the old config's id.
    cache = ss.setdefault("merge_times", {})
    again = st.button("Measure again", key="merge_again",
                      help=f"{MERGE_REPEATS} alternating repeats of each; a shared machine varies between clicks.")
    if again or (name, getattr(model, "generation", None)) not in cache:
        prompts, _ = analysis.make_prompts(model.adapter_task[name], n=32, seed=ui.seed())
        t = analysis.merged_vs_unmerged(model, name, prompts, repeats=MERGE_REPEATS)
        generation = getattr(model, "generation", None)  # after: taking the bank out of training mode moves it
        for old in [k for k in cache if k[1] != generation]:
            del cache[old]  # measured on a bank that has changed since
        cache[(name, generation)] = t
    merge_results(cache[(name, getattr(model, "generation", None))])


def ms(seconds):
    return f"{1000 * seconds:.2f} ms"


def merge_results(t):
    """One number per claim: the saving is the median of the paired differences (each repeat
    times both, one after the other), shown with its middle half and a verdict that holds only
    where that spread says so. Two separate medians are not shown beside it: on a busy machine
    their difference can disagree with the paired one, even in sign."""
    unmerged, saved = analysis.spread(t["unmerged_all"]), analysis.spread(t["saved_all"])
    with st.container(horizontal=True, gap="large"):
        st.metric("unmerged: W x, then phi", ms(unmerged["median"]), width="content",
                  help="median latency of a batch of 32 prompts, one forward pass, phi beside W")
        st.metric("merging saves (paired)", ms(saved["median"]), width="content",
                  help="with phi folded into W' once (LoRA: W + B A; IA3: W scaled), one matmul per projection: "
                       "the median over the repeats of (unmerged - merged), each pair timed back to back")
    st.caption(f"{saved['n']} repeats on {ui.device()}, each timing the batch unmerged and merged back to back. "
               f"Middle half of the repeats: unmerged [{ms(unmerged['q1'])} to {ms(unmerged['q3'])}], "
               f"saving [{ms(saved['q1'])} to {ms(saved['q3'])}].")
    middle = f"[{ms(saved['q1'])} to {ms(saved['q3'])}]"
    if saved["q1"] > 0:  # the middle half of the repeats agrees on the sign
        verdict = (f"Merging saves {ms(saved['median'])} per batch "
                   f"({100 * saved['median'] / unmerged['median']:.0f}%), {middle} over the repeats.")
    elif saved["q3"] < 0:
        verdict = (f"Merged is slower here by {ms(-saved['median'])} per batch "
                   f"[{ms(-saved['q3'])} to {ms(-saved['q1'])}] over the repeats.")
    else:
        verdict = (f"No difference beyond this machine's noise: unmerged minus merged is {ms(saved['median'])} "
                   f"per batch, but {middle} over the middle half of the repeats.")
    st.markdown(verdict)
    st.caption(f"Largest difference in the logits between the two: {t['max_abs_diff']:.1e} (float rounding). "
               "A merged model serves one task per copy of W; unmerged, one W serves every phi in a mixed batch.")


# ------------------------------------------------------------------ many phi become one
MAX_COMBINED = 12  # phi one combination takes: bounded work per click


def default_combination(names, task_of):
    """The visitor's newest phi with the others of its task (two students' phi of one task: the
    merge that keeps its task), else the first two."""
    mine = [n for n in list(ss.get("stored_ids", {}))[::-1] if n in task_of]
    if mine:
        same = [n for n in names if task_of[n] == task_of[mine[0]] and n != mine[0]]
        return [mine[0], *same][:MAX_COMBINED] if same else [mine[0], *[n for n in names if n != mine[0]][:1]]
    return names[:2]


def combine_panel(rows):
    st.markdown("HF peft's `add_weighted_adapter` turns several phi into one. Pick phi of one method, how to "
                "weigh them and how to combine them: the merged phi is scored on every source task in one mixed "
                "batch, beside the sources.")
    servable = [r for r in rows if r["task"] in peftcore.TASKS]
    kinds = ui.combining.combinable([r["peft_type"] for r in servable])
    if not kinds:
        st.info("No phi of a method whose phi combine (" + ", ".join(
            v.name for v in ui.method_views() if v.method.combinations) + ") in your bank.")
        return
    a, b = st.columns([1, 3])
    kind = a.selectbox("Method", kinds, key="combine_method", format_func=lambda t: ui.view_of(t).name)
    task_of = {r["name"]: r["task"] for r in servable if r["peft_type"] == kind}
    if ss.get("combine_for") != kind or not set(ss.get("combine_names", ())) <= set(task_of):
        ss["combine_for"], ss["combine_names"] = kind, default_combination(list(task_of), task_of)
    names = b.multiselect("phi to combine", list(task_of), key="combine_names", max_selections=MAX_COMBINED,
                          format_func=lambda n: f"{n} ({task_of[n]})",
                          help=f"At most {MAX_COMBINED}; their weights follow this order.")
    try:
        options, weighting, weights = ui.combining.controls("combine", peftcore.METHODS[kind], len(names))
    except ValueError as e:
        st.error(f"Weights: {e}.")
        return
    if not st.button("Combine into one phi", key="combine_go", type="primary", disabled=not names):
        return
    try:
        report = analysis.merge_report(ui.bank(), names, weights, seed=ui.seed(), **options)
        curve = analysis.svd_curve(ui.bank(), names, weights) if options["combination_type"] == "svd" else None
    except ValueError as e:  # a combination these phi cannot take (ranks, DoRA with plain): peft's reason
        st.error(f"Not combined: {ui.plain(e, 300)}.")
        ss.pop("combined", None)
        return
    ss["combined"] = dict(report, curve=curve, weights=weights, rank=options.get("svd_rank"))


def combined_results():
    done = ss.get("combined")
    if not done:
        return
    weights = ", ".join(f"{w:g}" for w in done["weights"])
    st.subheader(f"{done['combination_type']} of {len(done['weights'])} phi, weights {weights}")
    ui.combining.task_table(done)
    st.markdown(ui.combining.verdict(done))
    st.markdown(ui.combining.size_line(done))
    ui.combining.cross_terms_note(done)
    if done["curve"]:
        ui.combining.svd_chart(done["curve"], f"rank {done['rank']}" if done["rank"] else "the largest source r",
                               key="combine_curve")
    stem = f"merged-{done['combination_type']}"
    a, b = st.columns(2)
    a.download_button("Download the merged phi", done["file"], file_name=f"{stem}.safetensors", key="combine_dl",
                      help="A .safetensors file HF peft loads (PeftModel.from_pretrained), like any phi here.")
    b.button("Save it to my bank", key="combine_save", on_click=save_combined, args=(stem,),
             help="Then it is served, downloaded and saved into a class like any phi you trained.")
    if "combine_msg" in ss:
        kind, text = ss.pop("combine_msg")
        (st.success if kind == "success" else st.error)(text)


def save_combined(stem):
    """The Save button's callback: it runs before the page draws, so the bank above shows the phi."""
    name = ui.unique_name(stem)
    try:
        ui.add_to_bank(name, ss["combined"]["file"])
    except peftcore.AdapterLoadError as e:
        ss["combine_msg"] = ("error", f"Not saved: {ui.plain(e, 300)}")
    else:
        ss["combine_msg"] = ("success", f"Saved {ui.literal(name, 64)} to your bank.")

st.title("Many tasks at once")
st.markdown(
    "One frozen base stays in memory; every task is a small **phi** beside it. Your bank starts with the "
    "library shipped with the app (one trained phi per method and task) plus whatever you save or upload. "
    "Serving mixes tasks in one batch: each row is routed through its own phi in the same forward pass.")

facts = ui.base_facts(ui.device())
rows = []
st.header("Your bank")
with ui.panel("Your bank"):
    ui.bank()
    for error in ss.get("library_errors", []):
        st.warning(f"Left out of your bank: {ui.plain(error, 300)}")  # may quote a file's own text
    rows = ui.bank_rows()
    if rows:
        bank_table(rows, facts)
        remove_widget([r["name"] for r in rows])
    else:
        st.info("Your bank is empty: the library is not there yet. Save a phi on *Train a sliver* or upload one.")
with ui.panel("Uploading"):
    upload_widget()

st.header("Serve a mixed batch")
if rows:
    with ui.panel("Serving"):
        serve_panel(rows)
        served_results()
    st.header("Many phi become one")
    with ui.panel("Combining phi"):
        combine_panel(rows)
        combined_results()
    left, right = st.columns(2, gap="large")
    with left, ui.panel("The swap timing"):
        swap_panel(rows)
    with right, ui.panel("The merge timing"):
        merge_panel(rows)
else:
    st.info("Nothing to serve yet.")
