"""AppTest per page: each runs cleanly; the storage chart plots the exact formula; a short
training run finishes and shows its results; Stop works; a bad upload gets an error."""
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the app's own modules (ui, pages) as `streamlit run` sees them

import peftcore  # noqa: E402
import ui  # noqa: E402
from apptest import open_page, wait_for  # noqa: E402
from peftcore.library import LIBRARY_DIR  # noqa: E402
from peftcore.presets import longer_budget, robustness  # noqa: E402

PAGES = {"app_pages/storage.py": "One base, many tasks", "app_pages/train.py": "Train a sliver",
         "app_pages/serve.py": "Many tasks at once", "app_pages/inside.py": "Inside: why it works"}




def assert_clean(at):
    assert not at.exception, [e.value for e in at.exception]


def button(at, key):
    return at.button(key=key)


def bank_of(at):
    return at.session_state["bank:" + peftcore.resolve_device("auto")]


def chart(at, key):
    charts = [c for c in at.get("plotly_chart") if key in c.proto.id]
    assert charts, f"no plotly chart with key {key}"
    return json.loads(charts[0].proto.spec)


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_runs(page):
    at = open_page(page)
    assert at.title[0].value == PAGES[page]
    assert at.sidebar.selectbox(key="device").value == peftcore.resolve_device("auto")  # app.py ran too


def test_sidebar_and_reset():
    at = open_page("app_pages/train.py")
    at.sidebar.number_input(key="seed").set_value(7).run()
    assert at.sidebar.number_input(key="seed").value == 7
    at.session_state["groups"] = {"train": ["gone"]}
    at.sidebar.button[0].click().run()  # reset my session
    assert_clean(at)
    assert "train" not in at.session_state["groups"]
    assert at.sidebar.number_input(key="seed").value == 0


@pytest.mark.parametrize("p_pct", [0.01, 0.5, 1.0, 7.0, 100.0])
def test_phi_slider_plots_the_formula(p_pct):
    at = open_page()
    at.select_slider(key="p").set_value(p_pct).run()
    assert_clean(at)
    fig = chart(at, "storage_chart")
    peft, full = trace(fig, "PEFT"), trace(fig, "full fine-tuning")
    x = np.array(peft["x"], dtype=float)
    assert np.array_equal(np.array(peft["y"]), 1 + x * (p_pct / 100))  # exactly the formula
    assert np.array_equal(np.array(full["y"]), x)
    assert x.max() == at.select_slider(key="T").value
    headline = [m.value for m in at.markdown if m.value.startswith("## ")][0]
    assert f"at {p_pct:g}%" in headline


def trace(fig, name):
    """The figure's one trace whose legend name starts with `name`."""
    found, = [t for t in fig["data"] if t.get("name", "").startswith(name)]
    return found


def test_sentence_log_axes_and_bytes():
    at = open_page()
    at.select_slider(key="p").set_value(0.5)
    at.select_slider(key="T").set_value(100)
    at.toggle(key="log").set_value(True).run()
    assert_clean(at)
    assert any(m.value == "## With 100 tasks at 0.5%, PEFT stores 1.5 base models; full fine-tuning stores 100."
               for m in at.markdown)
    fig = chart(at, "storage_chart")
    assert fig["layout"]["xaxis"]["type"] == "log" and trace(fig, "PEFT")["x"][0] == 1
    at.radio(key="unit").set_value("bytes").run()
    fig = chart(at, "storage_chart")
    x, base_bytes = np.array(trace(fig, "PEFT")["x"], dtype=float), peftcore.base_file_bytes()
    assert np.allclose(trace(fig, "PEFT")["y"], (1 + 0.005 * x) * base_bytes, rtol=1e-12)


def start_training(at, steps_key, steps):
    at.slider(key=steps_key).set_value(steps)
    button(at, "train_go").click().run()
    assert_clean(at)
    assert not at.error, [e.value for e in at.error]


def results_shown(at):
    return any(s.value.startswith("Results on") for s in at.header)


def test_training_run_finishes_and_shows_results():
    at = open_page("app_pages/train.py")
    start_training(at, "steps-LoRA", 10)
    run_ids = at.session_state["groups"]["train"]
    assert at.query_params["train"] == ",".join(run_ids)  # a refreshed page finds the run again
    wait_for(at, results_shown)
    metrics = {m.label: m.value for m in at.metric}
    lora = peftcore.presets.PRESETS["LORA"].config
    assert metrics["trainable parameters"] == f"{lora.num_params(peftcore.load_base().config):,}"
    assert metrics["held-out exact match"].endswith("%")
    assert any("**unchanged**" in m.value for m in at.markdown)
    assert at.get("download_button")
    assert any("| target | output |" in m.value for m in at.markdown)  # sample predictions
    digits = chart(at, f"digits-{run_ids[0]}")["data"][0]["y"]  # each answer digit's accuracy, in %
    assert len(digits) == 8 and sum(digits) / 8 == pytest.approx(float(metrics["digit accuracy"][:-1]), abs=0.06)
    # the lesson on the first click: this LoRA beside full fine-tuning, parameters counted, accuracy recorded
    beside = at.table[0].value
    full = peftcore.presets.robustness("FULL", "times_3")
    assert list(beside["phi"]) == ["LoRA, this run", "LoRA's preset, 5 seeds (recorded)",
                                "Full fine-tuning's preset, 5 seeds (recorded)"]
    assert list(beside["trainable parameters"])[2] == f"{sum(p.numel() for p in peftcore.load_base().parameters()):,}"
    assert list(beside["of the base"])[2] == "100%" and str(round(100 * full["min"])) in list(beside["held-out exact match"])[2]
    copied = [c.value for c in at.code if "import peft" in c.value]  # "Copy as HF peft code" (tests/test_hf_code.py runs it)
    assert len(copied) == 2 and "target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']" in copied[0]
    assert "peft.LoraConfig(r=1, lora_alpha=4" in copied[1] and "lora-times_3" in copied[1]

    at.button(key=f"save-{run_ids[0]}").click().run()
    assert_clean(at)
    assert at.success and "lora-times_3" in at.success[0].value
    assert "lora-times_3" in bank_of(at).peft_config

    refreshed = open_page("app_pages/train.py", query={"train": ",".join(run_ids)})  # a new session, same URL
    assert results_shown(refreshed)


def test_stop_ends_a_run():
    at = open_page("app_pages/train.py")
    start_training(at, "steps-LoRA", 1000)
    at.button(key="stop-train").click().run()
    wait_for(at, results_shown)
    assert "stopped" in at.get("progress")[0].proto.text


def test_bad_upload_shows_an_error_and_changes_nothing():
    at = open_page("app_pages/serve.py")
    bank = bank_of(at)
    before = dict(bank.peft_config)
    at.file_uploader(key="upload").set_value(("bad.safetensors", b"\x80\x04 a pickle, not a phi", "application/octet-stream"))
    at.run()
    assert_clean(at)
    assert at.error and "not loaded" in at.error[0].value
    assert bank.peft_config == before

    model = peftcore.get_peft_model(peftcore.load_base(), peftcore.LoraConfig(r=2))
    model.adapter_task["default"] = "times_3"
    at.file_uploader(key="upload").set_value(("my phi.safetensors", peftcore.adapter_to_bytes(model), "application/octet-stream"))
    at.run()
    assert_clean(at)
    assert at.success and "my-phi" in at.success[0].value and "my-phi" in bank.peft_config


def test_serving_a_mixed_batch():
    at = open_page("app_pages/serve.py")
    model = peftcore.get_peft_model(peftcore.load_base(), peftcore.LoraConfig(r=2))
    model.adapter_task["default"] = "complement"
    at.file_uploader(key="upload").set_value(("c.safetensors", peftcore.adapter_to_bytes(model), "application/octet-stream"))
    at.run()
    at.multiselect(key="serve_names").set_value(["c"])
    at.text_input(key="serve_digits").set_value("12345678")
    button(at, "serve_go").click().run()
    assert_clean(at)
    labels = [m.label for m in at.metric]
    assert "2 requests in one mixed batch" in labels and "2 requests, swapping phi" in labels  # both for all rows
    assert any("| 12345678 | 87654321 |" in m.value for m in at.markdown)  # the complement's target
    at.text_input(key="serve_digits").set_value("12x")
    button(at, "serve_go").click().run()
    assert any("exactly 8 digits" in e.value for e in at.error)

    at.switch_page("app_pages/storage.py").run()  # the bank's files appear on the storage chart, measured
    measured = [t for t in chart(at, "storage_chart")["data"] if t.get("name", "").startswith("measured")]
    bank = bank_of(at)
    assert measured and len(measured[0]["x"]) == len(bank.peft_config)
    sizes = [len(peftcore.adapter_to_bytes(bank, n)) / peftcore.base_file_bytes() for n in bank.peft_config]
    assert np.allclose(measured[0]["y"], 1 + np.cumsum(sizes))
    names = [t.get("name", "") for t in chart(at, "storage_chart")["data"]]  # drawn in order: the line over the circles
    assert names.index(measured[0]["name"]) < next(i for i, n in enumerate(names) if n.startswith("PEFT"))


# ------------------------------------------------------------------ storage: links, T*, the chart's marks
def test_a_bad_value_in_a_link_is_reset_with_a_message():
    at = open_page(query={"p": "abc", "T": "-5", "log": "maybe"})
    toasts = [t.value for t in at.toast]
    assert any("p=`'abc'`" in t and "reset to 1%" in t for t in toasts), toasts
    assert any("T=`'-5'`" in t and "reset to 100" in t for t in toasts), toasts  # a literal: markdown reads none of it
    assert any("log=`'maybe'`" in t and "reset to off" in t for t in toasts), toasts
    assert at.select_slider(key="p").value == 1.0 and at.select_slider(key="T").value == 100
    assert not open_page(query={"p": "0.5%", "T": "1000", "log": "true"}).toast  # a good link: no message


@pytest.mark.parametrize("p_pct, t_star", [(0.01, "1.0001"), (0.015, "1.00015"), (1.0, "1.01"), (50.0, "2")])
def test_t_star_shows_the_digits_that_tell_it_from_one(p_pct, t_star):
    at = open_page(query={"p": f"{p_pct:g}%"})
    assert at.latex[-1].value.strip("$\n").endswith(f"= {t_star}")
    notes = [a["text"] for a in chart(at, "storage_chart")["layout"]["annotations"]]
    assert f"break-even T* = {t_star}" in notes


def test_break_even_is_drawn_above_the_measured_phi_and_log_ticks_are_plain():
    at = open_page(query={"p": "0.01%", "T": "10000", "log": "true"})
    fig = chart(at, "storage_chart")
    order = [t.get("name") or t.get("hovertemplate", "") for t in fig["data"]]
    measured = next(i for i, n in enumerate(order) if n.startswith("measured"))
    break_even = next(i for i, n in enumerate(order) if n.startswith("break-even"))
    assert break_even > measured  # plotly draws later traces on top
    for axis in ("xaxis", "yaxis"):
        assert fig["layout"][axis]["ticktext"] == ["1", "10", "100", "1,000", "10,000"]
    assert any(a["text"].startswith("saves") for a in fig["layout"]["annotations"])
    assert len(fig["data"][measured]["x"]) <= 10_000

    at = open_page(query={"p": "1%", "T": "10", "log": "true"})  # the measured phi stop where the chart does
    fig = chart(at, "storage_chart")
    measured = [t for t in fig["data"] if t.get("name", "").startswith("measured")][0]
    assert max(measured["x"]) <= 10 and len(bank_of(at).peft_config) > 10


@pytest.mark.parametrize("low, high", [(1.6, 2.9), (2.05, 2.3), (0.3, 0.9), (1.99, 2.01), (0.02, 3.0), (1, 10_000)])
def test_a_log_axis_has_three_or_more_plain_ticks_in_its_range(low, high):
    # a short run's loss spans less than a factor of 2: the 1, 2, 5 steps alone left one tick
    ticks = ui.log_ticks(low, high)
    inside = [text for v, text in zip(ticks["tickvals"], ticks["ticktext"]) if low <= v <= high]
    assert len(inside) >= 3 and len(set(inside)) == len(inside)
    assert all("e" not in text for text in ticks["ticktext"])  # 0.5, 1,000: never 5e-01 or 1e+03


# ------------------------------------------------------------------ serve: the bank follows, timings with spread
def lora_file(task, r=2):
    model = peftcore.get_peft_model(peftcore.load_base(), peftcore.LoraConfig(r=r))
    model.adapter_task["default"] = task
    return peftcore.adapter_to_bytes(model)


def tasks_line(at):
    return next(m.value for m in at.markdown if "stored as one base" in m.value)


def test_an_upload_updates_the_bank_and_the_serving_choices_at_once():
    at = open_page("app_pages/serve.py")
    n = len(bank_of(at).peft_config)
    assert tasks_line(at).startswith(f"**{n} phi**")
    upload = ("new one.safetensors", lora_file("complement"), "application/octet-stream")
    at.file_uploader(key="upload").set_value(upload)
    at.run()  # one run: the table, its count and the choices below already hold the new phi
    assert_clean(at)
    assert tasks_line(at).startswith(f"**{n + 1} phi**")
    assert "new-one" in [row for row in at.table[0].value["name"]]
    assert "new-one (complement)" in at.multiselect(key="serve_names").options
    assert "new-one" in at.multiselect(key="serve_names").value  # and it is served next

    at.selectbox(key="remove_name").set_value("new-one")
    at.button(key="remove").click().run()
    assert_clean(at)
    assert tasks_line(at).startswith(f"**{n} phi**")
    assert "new-one (complement)" not in at.multiselect(key="serve_names").options


def test_sort_rows_are_explained():
    at = open_page("app_pages/serve.py")
    assert "lora-sort" in at.multiselect(key="serve_names").value  # the default batch has every task
    button(at, "serve_go").click().run()
    assert_clean(at)
    note = [i.value for i in at.info if "sort rows are wrong" in i.value]
    assert note and "live training budget" in note[0]
    recorded = json.loads((LIBRARY_DIR / "index.json").read_text())["lora-sort"]["eval_exact"]
    assert f"LoRA {100 * recorded:.1f}%" in note[0]  # the recorded figure, not a typed one


def test_merge_timing_is_a_median_with_its_spread_keyed_on_the_bank_generation():
    at = open_page("app_pages/serve.py")
    bank = bank_of(at)
    metrics = {m.label: m.value for m in at.metric}
    assert "unmerged: W x, then phi" in metrics and "merged: W' x" not in metrics  # no second median to disagree
    assert any(c.value.startswith("15 repeats on") and "back to back" in c.value for c in at.caption)
    assert any(m.value.startswith(("Merging saves", "Merged is slower", "No difference")) for m in at.markdown)
    (key, t), = at.session_state["merge_times"].items()
    assert key == (at.selectbox(key="merge_name").value, bank.generation)
    assert len(t["unmerged_all"]) == len(t["merged_all"]) == 15
    # one number per claim: the headline saving is the median of the paired differences the verdict reads
    assert metrics["merging saves (paired)"] == f"{1000 * statistics.median(t['saved_all']):.2f} ms"
    at.run()  # nothing changed: the same measurement, not a new one on every rerun
    assert at.session_state["merge_times"][key] is t
    at.button(key="swap_time").click().run()  # timing a swap measures the swap only
    assert at.session_state["merge_times"][key] is t and key[1] == bank.generation

    at.file_uploader(key="upload").set_value(("m.safetensors", lora_file("times_3"), "application/octet-stream"))
    at.run()  # the bank changed: its generation moved, the old timing is dropped, a new one made
    assert_clean(at)
    (key2, t2), = at.session_state["merge_times"].items()
    assert key2 == (key[0], bank.generation) and key2[1] != key[1] and t2 is not t


@pytest.mark.parametrize("method, task, why", [("LoRA", "times_3", None), ("Prompt tuning", "times_3", "Lester"),
                                               ("LoRA", "sort", "Sorting compares")])
def test_the_seed_note_is_the_recorded_table_and_says_why_a_row_never_solves(method, task, why):
    at = open_page("app_pages/train.py")
    at.selectbox(key="method").set_value(method).run()
    at.selectbox(key="task").set_value(task).run()
    assert_clean(at)
    peft_type = ui.view_named(method).peft_type
    rec = robustness(peft_type, task)
    note = [c.value for c in at.caption if "seeds**" in c.value]
    assert len(note) == 1 and f"**{rec['solved']} of {rec['seeds']} seeds**" in note[0]
    assert (why in note[0]) if why else (rec["solved"] > 0 and "Lester" not in note[0] and "Sorting" not in note[0])
    more = longer_budget(peft_type, task)
    assert (more is not None) == (task == "sort")  # sort's longer budget is recorded: the lesson is not "never"
    if more:  # the chosen method's longer budget, and every other one recorded beside it
        assert f"{method} with {more[0]} steps reached {round(100 * more[1]['min'])}" in note[0]
        assert note[0].count(" steps reached ") == sum(bool(longer_budget(v.peft_type, task)) for v in ui.method_views())


def test_the_race_table_says_not_solved_instead_of_none():
    at = open_page("app_pages/train.py")
    at.radio(key="mode").set_value("Race").run()
    at.pills(key="race_methods").set_value(["LoRA", "Prompt tuning"]).run()
    start_training(at, "race_steps", 10)
    wait_for(at, results_shown)
    solved = list(at.table[0].value["solved at step"])
    assert "not solved" in solved  # 10 steps of prompt tuning solve nothing
    assert all(s == "not solved" or s.isdigit() for s in solved), solved


def test_a_race_ends_when_its_slowest_run_has_stopped_improving():
    """Prompt tuning sits at 0% exact match on times_3 from its first evaluation: with Stop when
    solved (the default) it stops after PATIENCE_STEPS more steps, and the page says why."""
    at = open_page("app_pages/train.py")
    at.radio(key="mode").set_value("Race").run()
    at.pills(key="race_methods").set_value(["LoRA", "Prompt tuning"]).run()
    start_training(at, "race_steps", 300)
    wait_for(at, results_shown)
    step = 25 + ui.PATIENCE_STEPS  # its first evaluation, then PATIENCE_STEPS without a better one
    lora, prompt = at.table[0].value["solved at step"]
    assert lora.isdigit() and prompt == f"not solved: stopped improving at step {step}"


def test_a_result_that_did_not_solve_says_why():
    """Prompt tuning's result on times_3 (0%): the tab says why, not just the number."""
    at = open_page("app_pages/train.py")
    at.selectbox(key="method").set_value("Prompt tuning").run()
    start_training(at, "steps-Prompt tuning", 10)
    wait_for(at, results_shown)
    why = [i.value for i in at.info if i.value.startswith("Prompt tuning reached")]
    assert len(why) == 1 and "its 10 steps ran out" in why[0] and "Lester" in why[0], why


def test_lora_family_options_come_from_a_link_are_explained_and_train():
    """rsLoRA, DoRA and LoRA+ set by a teacher's link: the page says what each changes with the
    config's own numbers, and the run trains the phi they describe (DoRA's magnitude counted)."""
    at = open_page("app_pages/train.py", query={"r": "4", "use_rslora": "true", "use_dora": "true", "optimizer": "loraplus",
                                               "loraplus_lr_ratio": "8"})
    assert at.toggle(key="lora.use_rslora").value and at.toggle(key="lora.use_dora").value
    assert at.radio(key="lora.optimizer").value == "loraplus"
    said = " ".join(c.value for c in at.caption)
    assert "α/√r = 4/√4 = 2" in said and "2 times plain's at r = 4" in said and "B learns 8 times faster" in said
    start_training(at, "steps-LoRA", 10)
    wait_for(at, results_shown)
    config = peftcore.LoraConfig(r=4, lora_alpha=4, target_modules=("q", "k", "v", "o"), use_rslora=True, use_dora=True)
    assert {m.label: m.value for m in at.metric}["trainable parameters"] == \
        f"{config.num_params(peftcore.load_base().config):,}"
