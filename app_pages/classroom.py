"""Class: one base, a whole room of tasks. A teacher starts a class (a join code for the room,
a teacher key shown once); students join with the code (kept in the URL: ?class=CODE) and
save phi from their session bank into the class; the board lists every phi, the storage
chart prices the class's real files, and one mixed batch serves every phi in the class at
once on the one shared base. UI only: the store is reached through ui, the torch work is peftcore.
"""
import numpy as np
import streamlit as st

import peftcore
import ui
from peftcore import analysis, library
from peftcore.storage import human_bytes

ss = st.session_state
MAX_SERVED = 120  # rows of the class's mixed batch: one per phi, the class cap
TIMED_PASSES = 3  # timings of the class's mixed batch and swap loop, median taken...
ONE_PASS_FROM = 30  # ...up to this many phi; from here each pass is already this many requests: one pass


# ------------------------------------------------------------------ the class in the link
def current_class():
    """The class of ?class=CODE, or None (with a clear message for a bad or unknown code)."""
    raw = st.query_params.get("class")
    if not raw:
        return None
    try:
        return ui.store().class_info(raw, client=ui.client())
    except ui.StoreError as e:
        ui.forget_class()  # said once; the link no longer carries it
        st.error(f"The class in this link cannot be opened: {e}.")
        return None


# ------------------------------------------------------------------ starting and joining
def start_or_join():
    left, right = st.columns(2, gap="large")
    with left, st.form("create_form"):
        st.markdown("**Teachers: start a class**")
        name = st.text_input("Class name", key="class_name", max_chars=40, placeholder="e.g. Monday group")
        if st.form_submit_button("Start a class", type="primary", key="create_class"):
            try:
                code, key = ui.store().create_class(name)
                ui.become_teacher(code, key)
            except ui.StoreError as e:
                st.error(str(e))
            else:
                ss["new_class_key"] = (code, key)  # shown once, from here; gone with "I have copied the key"
                st.query_params["class"] = code
                st.rerun()
    with right, st.form("join_form"):
        st.markdown("**Students: join a class**")
        typed = st.text_input("Join code", key="join_code", max_chars=12, placeholder="e.g. ABC234")
        if st.form_submit_button("Join", key="join_class"):
            code = ui.normalize_code(typed)
            try:
                if code is None:
                    raise ui.StoreError(f"a join code is {ui.CODE_LEN} of the letters and digits {ui.CODE_ALPHABET} (no 0, 1, I, L "
                                        "or O: they read alike on a projector), e.g. ABC234")
                ui.store().join(code, client=ui.client())
            except ui.StoreError as e:
                st.error(f"Cannot join: {e}.")
            else:
                st.query_params["class"] = code
                st.rerun()


def class_header(info):
    st.header(f"{ui.as_text(info.name)} · join code {info.code}" + ("" if info.is_open else " · closed"))
    new = ss.get("new_class_key")
    if new and new[0] == info.code:
        st.success(f"Class started. Students open this page and type the join code **{info.code}** "
                   f"(or open a link ending in `?class={info.code}`).")
        st.warning("Your **teacher key** deletes any phi in the class and closes it. It is shown only now: "
                   "copy it somewhere safe (this browser keeps teacher mode without it).")
        st.code(new[1], language=None)
        st.button("I have copied the key", key="hide_key", on_click=ss.pop, args=("new_class_key", None))
    a, b = st.columns([3, 1], vertical_alignment="bottom")
    a.caption(f"{info.n_phi} phi in the class, {human_bytes(info.bytes)}.")
    if b.button("Leave this class", key="leave_class", width="stretch"):
        ui.forget_class()
        st.rerun()


# ------------------------------------------------------------------ saving into the class
def measured_exact(name):
    """Held-out exact match of the bank's phi `name`, measured here (cached per phi object)."""
    model = ui.bank()
    task = model.adapter_task.get(name)
    if task not in peftcore.TASKS:
        return None
    cache = ss.setdefault("class_exact", {})
    key = (name, model.generation)  # a re-added name is a new phi
    if key not in cache:
        with analysis.keep_active(model):
            model.set_adapter(name)
            cache[key] = float(peftcore.evaluate(model, task)[0])
    return cache[key]


def own_phi(rows):
    """The bank's phi this visitor saved (trained, or uploaded), newest first: store ids grow
    with every save, so the phi just saved comes first."""
    stored = ss.get("stored_ids", {})
    return sorted((r["name"] for r in rows if r["name"] in stored), key=stored.get, reverse=True)


@st.cache_resource
def library_names():
    return {name for name, _ in library.entries()}


def phi_label(name):
    """How the save box names a phi: the shipped ones say so."""
    return f"library: {name}" if name in library_names() and name not in ss.get("stored_ids", {}) else name


def choose_default(mine, options):
    """Select the visitor's newest phi whenever it changes (a new save), or when the box has
    nothing valid selected; never a library phi (a room that clicks the default would fill the
    board with identical library rows)."""
    newest = mine[0] if mine else None
    if ss.get("class_phi_newest") != newest or ss.get("class_phi") not in options:
        ss["class_phi_newest"] = newest
        ss["class_phi"] = newest


def save_into_class(code, class_name):
    """The Save button's callback: it runs before the page draws, so the class header's counts
    drawn above already include the new phi."""
    name = ss.get("class_phi")
    if name is None:
        ss["class_save_msg"] = ("error", "Choose a phi to save first.")
        return
    try:
        data = peftcore.adapter_to_bytes(ui.bank(), name)
        rec = ui.store().save_phi(ui.bank_token(create=True), name, data, class_code=code,
                                  eval_exact=measured_exact(name), author=ss.get("class_author") or "anonymous",
                                  client=ui.client())
    except ui.StoreError as e:
        ss["class_save_msg"] = ("error", f"Not saved: {e}")
    except Exception:  # noqa: BLE001 - a callback is outside the page's panels: say it here, log the rest
        ui.log.exception("saving into a class failed")
        ss["class_save_msg"] = ("error", "Not saved: something went wrong on the server (its log has the details).")
    else:
        ss["class_save_msg"] = ("success", f"Saved {ui.literal(rec.name)} into {ui.as_text(class_name)} "
                                           f"({rec.bytes:,} bytes).")


def save_panel(info):
    st.markdown("**Save one of your phi into the class**")
    rows = ui.bank_rows()
    if not rows:
        st.info("Your bank is empty: train a phi on *Train a sliver* first.")
        return
    mine = own_phi(rows)
    options = mine + [r["name"] for r in rows if r["name"] not in mine]
    if not mine:
        st.info("You have no phi of your own yet: train one on *Train a sliver* and press **Save to my bank** "
                "(or upload one on *Many tasks at once*). A library phi can still be chosen below.")
    choose_default(mine, options)
    a, b, c = st.columns([2, 2, 1], vertical_alignment="bottom")
    # a long paste reaches the store, which says how long it was (the box would cut it silently)
    a.text_input("Your name on the board", key="class_author", max_chars=200,
                 help="Shown to the class next to your phi. Letters, digits, spaces, '.', \"'\" and '-'.")
    b.selectbox("phi from your bank", options, key="class_phi", format_func=phi_label,
                placeholder="Choose a library phi",
                help="Yours first, the one you saved last selected. Library phi ship with the app.")
    c.button("Save into the class", key="class_save", type="primary", width="stretch", disabled=not info.is_open,
             on_click=save_into_class, args=(info.code, info.name))
    if "class_save_msg" in ss:
        kind, text = ss.pop("class_save_msg")
        (st.success if kind == "success" else st.error)(text)
    if not info.is_open:
        st.caption("This class is closed: it takes no new phi.")


# ------------------------------------------------------------------ the board
# Characters one line of the board's free-text columns holds at their widths (student 130 px,
# name 160 px); a longer name or author makes the rows three lines tall, where the grid wraps text.
LINE_CHARS = {"student": 16, "name": 21}
TALL_ROW_PX = 80  # three lines; the grid wraps a cell's text only in rows taller than 64 px


def board_row_height(records):
    long = any(len(r.author or "anonymous") > LINE_CHARS["student"] or len(r.name) > LINE_CHARS["name"]
               for r in records)
    return TALL_ROW_PX if long else None


def board(info, records, merged=None):
    """Every phi of the class; `merged`: {task: exact match} of the class's merged phi, shown on
    each row beside the student's own."""
    facts = ui.base_facts(ui.device())
    token, handle = ui.bank_token(), ui.teacher_handle(info.code)
    rows = [dict(id=r.id, student=r.author or "anonymous", name=r.name,
                 method=ui.view_of(r.method).name, task=r.task,
                 phi_pct=100 * r.num_params / facts["params"], bytes=r.bytes,
                 exact=None if r.eval_exact is None else 100 * r.eval_exact,
                 yours=r.owned_by(token)) for r in records]
    if merged:
        for row in rows:
            score = merged.get(row["task"])
            row["class_merge"] = None if score is None else 100 * score
    st.dataframe(rows,
                 # widths in pixels for the free-text columns (names run to 40 and 64 characters):
                 # the whole board fits a 1280-pixel projector beside the sidebar, no sideways scroll;
                 # names too long for one line wrap whole in taller rows (board_row_height)
                 hide_index=True, key="class_board", row_height=board_row_height(records), column_config={
                     "id": st.column_config.NumberColumn("id", width=40),
                     "student": st.column_config.TextColumn("student", width=130),
                     "name": st.column_config.TextColumn("name", width=160),
                     "phi_pct": st.column_config.NumberColumn("phi %", format="%.3f%%"),
                     "bytes": st.column_config.NumberColumn("file bytes", format="localized"),
                     "exact": st.column_config.NumberColumn(
                         "exact match", format="%.1f%%", help="held-out exact match, measured when it was saved"),
                     "class_merge": st.column_config.NumberColumn(
                         "merged", format="%.1f%%", width=64, help="held-out exact match of the class's merged phi on "
                                                             "this row's task, beside the student's own"),
                     "yours": st.column_config.CheckboxColumn("yours")})
    mine = [r for r in records if r.owned_by(token)]
    deletable = records if handle else mine
    if deletable:
        a, b = st.columns([3, 1], vertical_alignment="bottom")
        label = {r.id: f"#{r.id} {r.author or 'anonymous'}: {r.name}" for r in deletable}
        phi_id = a.selectbox("Delete a phi" + (" (teacher)" if handle else " of yours"), list(label),
                             format_func=label.get, key="class_delete_id")
        if b.button("Delete", key="class_delete", width="stretch"):
            try:
                ui.store().delete_phi(phi_id, owner=token, teacher_handle=handle)
            except ui.StoreError as e:
                st.error(str(e))
            else:
                st.rerun()


def teacher_login(info):
    """The key box for a teacher whose browser is not in teacher mode (a new browser, or after leaving)."""
    wrong = ss.pop("wrong_teacher_key", False)
    with st.expander("I am the teacher of this class", expanded=wrong):
        typed = st.text_input("Teacher key", key="typed_teacher_key", type="password")
        if st.button("Use this key", key="use_teacher_key"):
            try:
                ui.become_teacher(info.code, typed.strip())
            except ui.StoreError:
                ss["wrong_teacher_key"] = True  # the rerun keeps the expander open over the message
            st.rerun()
        if wrong:
            st.error("That is not this class's teacher key: it was shown once, when the class was started.")


def teacher_panel(info):
    handle = ui.teacher_handle(info.code)
    if handle is None:
        teacher_login(info)
        return
    use = ui.store().usage(info.code)
    st.caption(f"Teacher: the class holds {use['phi']} of at most {use['phi_limit']} phi from {use['students']} "
               f"student(s), {human_bytes(use['bytes'])} of {human_bytes(use['bytes_limit'])} (each file counted "
               "once, however many rows name it).")
    a, b = st.columns(2)
    if info.is_open and a.button("Close the class", key="close_class",
                                 help="No more phi can be saved into it; the board stays."):
        try:
            ui.store().close_class(info.code, teacher_handle=handle)
        except ui.StoreError as e:
            st.error(str(e))
        else:
            st.rerun()
    b.button("Leave teacher mode", key="leave_teacher", on_click=ui.leave_teacher, args=(info.code,),
             help="This browser forgets that you are the teacher; your key brings teacher mode back.")
    st.caption("On a shared computer, leave teacher mode before you go: the next person at this browser "
               "would otherwise be the teacher.")


# ------------------------------------------------------------------ storage chart
def storage_figure(records, base_bytes):
    """1 + sum p over the class's measured files, against T full copies, T = 0..number of phi."""
    p = np.array([r.bytes / base_bytes for r in records])
    t = np.arange(len(p) + 1)
    peft = 1 + np.concatenate([[0.0], np.cumsum(p)])
    labels = ["the base alone"] + [f"+ {r.author or 'anonymous'}: {r.name}" for r in records]
    return ui.figure([
        dict(type="scatter", mode="lines+markers", name="PEFT: 1 + Σ p (this class's files)", x=t.tolist(),
             y=peft.tolist(), text=labels, line=dict(width=6, color=ui.PEFT_COLOR), marker=dict(size=9),
             hovertemplate="T = %{x}: %{y:.4f} base models<br>%{text}<extra></extra>"),
        dict(type="scatter", mode="lines", name="full fine-tuning: T copies", x=t.tolist(), y=t.astype(float).tolist(),
             line=dict(width=4, color="#888888"), opacity=0.45,
             hovertemplate="T = %{x}: %{y:.0f} base models<extra></extra>"),
    ], height=480, hovermode="x unified", xaxis=dict(title="number of phi in the class T", dtick=max(1, len(p) // 10)),
        yaxis=dict(title="storage (base models)", rangemode="tozero"))


def storage_section(records):
    facts = ui.base_facts(ui.device())
    base_bytes = facts["file_bytes"]
    ui.plot(storage_figure(records, base_bytes), ui.storage_sentence([r.bytes for r in records],
                                                                      [r.task for r in records], base_bytes),
            key="class_storage")


# ------------------------------------------------------------------ one mixed batch
def class_bank(path, device, phi_ids):
    """(a bank of its own over the shared base holding the class's phi `phi_ids` as phi<id>,
    the names loaded, what could not be loaded and why)."""
    model, errors, s = peftcore.PeftModel(ui.get_base(device)), [], ui.get_store(path)
    for phi_id in phi_ids:
        try:
            peftcore.load_adapter(model, f"phi{phi_id}", s.load_bytes(phi_id))
        except (ui.StoreError, peftcore.AdapterLoadError) as e:
            errors.append(f"phi #{phi_id}: {e}")
    return model, [f"phi{i}" for i in phi_ids if f"phi{i}" in model.peft_config], errors


@st.cache_resource(max_entries=8, show_spinner="Serving every phi of the class in one mixed batch...")
def class_report(path, device, phi_ids):
    """The class's mixed batch and its timings, computed once per state of the class (ids are
    never reused: a changed class is a new key) for the whole room, whatever a student's seed or
    how often they press: the work is bounded by the saves. It runs on a bank
    of its own over the shared base, dropped afterwards: nothing is shared but the base, which
    no forward pass changes, so no lock; only sessions asking for this very report wait for it."""
    model, names, errors = class_bank(path, device, phi_ids)
    repeats = TIMED_PASSES if len(names) < ONE_PASS_FROM else 1  # 120 phi: 11 s of CPU, not 17.5 (2 cores)
    report = analysis.serve_report(model, names, [model.adapter_task[n] for n in names], per=1, seed=0,
                                   repeats=repeats)
    return dict(names=names, report=report, errors=errors, repeats=repeats)


def timed(repeats):
    return f"median of {repeats} timings each" if repeats > 1 else "one timing each, after a warm-up pass"


def serve_section(records):
    servable = [r for r in records if r.task in peftcore.TASKS][:MAX_SERVED]
    if not servable:
        st.info("No phi of a known task to serve yet.")
        return
    ids = tuple(sorted(r.id for r in servable))
    if st.button(f"Serve all {len(servable)} phi in one mixed batch", key="class_serve", type="primary",
                 help="Computed once for the class as it stands: pressing again shows the same measurement."):
        ss["class_served"] = ids
    if ss.get("class_served") != ids:
        return
    result = class_report(ui.store_path(), ui.device(), ids)
    by_name, report = {f"phi{r.id}": r for r in servable}, result["report"]
    rows = [dict(row, task=f"{by_name[n].author or 'anonymous'}: {by_name[n].name} ({by_name[n].task})")
            for row, n in zip(report["rows"], result["names"])]
    for e in result["errors"]:
        st.warning(f"Skipped: {ui.plain(e, 300)}")  # a load error may quote the file's own text
    ui.serving_metrics(report["times"], len(rows))
    right = sum(r["correct"] for r in rows)
    st.caption(f"One request per phi ({len(rows)} rows, {right} answered right), greedy decoding of "
               f"8 digits on {ui.device()}, {timed(result['repeats'])}. Outputs of the mixed batch "
               f"{'equal' if report['same'] else 'DIFFER FROM'} one-request-at-a-time outputs.")
    ui.predictions_table(rows)


# ------------------------------------------------------------------ merging the class
@st.cache_resource(max_entries=8, show_spinner="Merging the class's phi into one...")
def class_merge(path, device, phi_ids, tasks, weighting, options):
    """The class's phi `phi_ids` combined into one (add_weighted_adapter, `options` as sorted
    items) and scored on every task in `tasks` in one mixed batch: computed once per state of
    the class and choice (ids are never reused), on a bank of its own over the shared base."""
    model, names, errors = class_bank(path, device, phi_ids)
    if not names:
        return dict(error="none of its files could be loaded", errors=errors)
    weights = ui.combining.equal_weights(weighting, len(names))
    try:
        report = analysis.merge_report(model, names, weights, tasks=tasks, own_scores=False, seed=0, **dict(options))
    except ValueError as e:  # a combination these phi cannot take (ranks, DoRA with plain): the reason
        return dict(error=str(e), errors=errors)
    return dict(report, errors=errors, weights=weights)


def merge_controls(records):
    """The teacher's choice: (phi ids of the method chosen, options as sorted items, weighting), or None."""
    servable = [r for r in records if r.task in peftcore.TASKS]
    kinds = ui.combining.combinable(r.method for r in servable)
    if not kinds:
        st.caption("Merging the class: no phi of a method whose phi combine (" + ", ".join(
            v.name for v in ui.method_views() if v.method.combinations) + ") on the board yet.")
        return None
    st.markdown("**Merge the class.** Every phi of one method on the board becomes one phi (HF peft's "
                "`add_weighted_adapter`), scored on every task the class trained, in one mixed batch; the board "
                "shows it beside each student's own.")
    count = {k: sum(r.method == k for r in servable) for k in kinds}
    kind = st.selectbox("Method to merge", kinds, key="class_merge_method",
                        format_func=lambda k: f"{ui.view_of(k).name} ({count[k]} phi)")
    ids = tuple(sorted(r.id for r in servable if r.method == kind))
    options, weighting, _ = ui.combining.controls("class_merge", peftcore.METHODS[kind], len(ids), typed=False)
    return ids, tuple(sorted(options.items())), weighting


def merge_section(info, records):
    choice = merge_controls(records)
    if choice is None:
        return
    ids, options, weighting = choice
    tasks = tuple(t for t in peftcore.TASKS if any(r.task == t for r in records))
    st.button("Merge the class", key="class_merge_go", type="primary", on_click=ss.__setitem__,
              args=("class_merged", (info.code, ids, tasks, weighting, options)),
              help="Computed once for the class as it stands and this choice: pressing again shows the same.")
    result = merged_class(info.code, records)
    if result is None:
        return
    if "error" in result:
        st.error(f"The class's phi were not merged: {ui.plain(result['error'], 300)}.")
        return
    for e in result["errors"]:
        st.warning(f"Left out: {ui.plain(e, 300)}")
    _, merged_ids, _, weighting, options = ss["class_merged"]
    chosen = dict(options)
    st.markdown(f"**The class's merged phi**: {len(merged_ids)} phi, `{chosen['combination_type']}`, weights "
                f"{ui.combining.WEIGHTINGS[weighting].split(':')[0]}"
                + ("" if merged_ids == ids else " (phi saved since are not in it: press again to include them)") + ".")
    own = {t: students_line([r for r in records if r.task == t and r.id in merged_ids]) for t in result["tasks"]}
    ui.combining.task_table(result, own=own)
    st.markdown(ui.combining.size_line(result))
    stem = f"class-merge-{chosen['combination_type']}"
    a, b = st.columns(2)
    a.download_button("Download the merged phi", result["file"], file_name=f"{stem}.safetensors",
                      key="class_merge_dl", help="A .safetensors file HF peft loads, like any phi here.")
    b.button("Save it into the class", key="class_merge_save", on_click=save_merged, args=(info, stem),
             disabled=not info.is_open, help="It joins the board, by \"class merge\".")
    if "class_merge_msg" in ss:
        outcome, text = ss.pop("class_merge_msg")
        (st.success if outcome == "success" else st.error)(text)


def merged_class(code, records):
    """The teacher's last merge of class `code` while every phi in it is still on the board
    (cached per state of the class and choice), or None."""
    chosen = ss.get("class_merged")
    if not chosen or chosen[0] != code or not set(chosen[1]) <= {r.id for r in records}:
        return None
    _, ids, tasks, weighting, options = chosen
    return class_merge(ui.store_path(), ui.device(), ids, tasks, weighting, options)


def merged_scores(code, records):
    """{task: exact match} of the class's merged phi, for the board, or None."""
    result = merged_class(code, records)
    return None if result is None or "error" in result else result["merged"]


def students_line(records):
    scored = [r.eval_exact for r in records if r.eval_exact is not None]
    if not records:
        return None
    mean = f", mean {100 * sum(scored) / len(scored):.1f}%" if scored else ""
    return f"{len(records)} phi{mean}"


def save_merged(info, stem):
    """The Save button's callback: it runs before the page draws, so the board shows the phi."""
    result = merged_class(info.code, ui.store().list_phi(class_code=info.code))
    if result is None:
        ss["class_merge_msg"] = ("error", "Not saved: the merged phi is gone (a phi in it was deleted). Merge again.")
        return
    try:
        rec = ui.store().save_phi(ui.bank_token(create=True), stem, result["file"], class_code=info.code,
                                  eval_exact=result["merged"].get(result["task"]), author="class merge",
                                  client=ui.client())
    except ui.StoreError as e:
        ss["class_merge_msg"] = ("error", f"Not saved: {e}")
    else:
        ss["class_merge_msg"] = ("success", f"Saved {ui.literal(rec.name)} into {ui.as_text(info.name)} "
                                            f"({rec.bytes:,} bytes).")


# ------------------------------------------------------------------ the page
st.title("Class")
st.markdown("Thirty students, thirty tasks, **one base**. Each student saves the phi they trained into the "
            "class; the class's storage is one base plus the slivers, and one server answers every task "
            "at once in a single mixed batch.")

ui.bank_token()  # a malformed ?bank= gets its message on every page of the class
try:
    info = current_class()
except ui.StoreError as e:  # the store itself cannot be opened
    st.error(f"The class store is not available: {e}")
    st.stop()
if info is None:
    with ui.panel("Starting or joining a class"):
        start_or_join()
else:
    records = []
    with ui.panel("The class"):
        class_header(info)
    with ui.panel("Saving into the class"):
        save_panel(info)
    st.header("Class board")
    with ui.panel("The class board"):
        records = ui.store().list_phi(class_code=info.code)
        if records:
            board(info, records, merged_scores(info.code, records))
        else:
            st.info("No phi in the class yet: the first one saved appears here.")
    with ui.panel("Teacher mode"):
        teacher_panel(info)
    if records and ui.teacher_handle(info.code):
        with ui.panel("Merging the class"):
            merge_section(info, records)
    if records:
        st.header("What the class stores")
        with ui.panel("The class's storage"):
            storage_section(records)
        st.header("Serve the whole class at once")
        with ui.panel("Serving the class"):
            serve_section(records)
