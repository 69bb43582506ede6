"""Many phi become one, as the pages show it (issue 34, items 3 and 4): what a combination
measures (peftcore.analysis.merge_report, svd_curve) against the same numbers computed the
plain way, one phi at a time; the Serve page's panel; a teacher's "Merge the class"."""
import json

import pytest
import torch

import peftcore
from apptest import open_page
from peftcore import PeftModel, analysis, library
from peftcore.library import LIBRARY_DIR
from peftcore.methods.lora import LoraLinear
from peftcore.service.store import Store

SERVE = "app_pages/serve.py"
CLASS = "app_pages/classroom.py"


@pytest.fixture(scope="module")
def bank():
    """The shipped library over the base, as a visitor's bank holds it (never changed here:
    merge_report and svd_curve take out what they add)."""
    model, errors = library.load_library(peftcore.load_base())
    assert not errors
    return model


def plain_score(model, name, task, n=None):
    """Held-out exact match of phi `name` on `task`, alone (set_adapter), on the first n rows."""
    x, y = peftcore.TASKS[task].eval_set()
    with analysis.keep_active(model), torch.no_grad():
        model.set_adapter(name)
        model.eval()
        return peftcore.tasks.answer_metrics(model(x[:n]), y[:n])[0]


def state(model):
    return list(model.peft_config), model.generation, model.active_adapter


# ------------------------------------------------------------------ the measurements
def test_a_merge_report_scores_as_each_phi_alone_and_leaves_the_bank_as_it_was(bank):
    sources, before = ["lora-times_3", "lora-complement"], state(bank)
    report = analysis.merge_report(bank, sources, [0.5, 0.5], n=128, combination_type="svd")
    assert state(bank) == before
    bank.add_weighted_adapter(sources, [0.5, 0.5], "check", combination_type="svd")
    try:
        assert report["tasks"] == [t for t in peftcore.TASKS if t in ("times_3", "complement")]  # the registry order
        for task in report["tasks"]:
            assert report["merged"][task] == pytest.approx(plain_score(bank, "check", task, 128), abs=1e-9)
        for name in sources:
            assert report["sources"][name] == pytest.approx(plain_score(bank, name, bank.adapter_task[name], 128),
                                                            abs=1e-9)
        assert report["sources"]["lora-times_3"] == 1.0  # the shipped phi solves its task
        assert report["params"] == bank.adapter_num_params("check") and report["exact_sum"] is None
        loaded = PeftModel(peftcore.load_base())
        peftcore.load_adapter(loaded, "m", report["file"])
        mine, want = loaded.adapter_state_dict("m"), bank.adapter_state_dict("check")
        assert set(mine) == set(want) and all(torch.equal(mine[k], want[k]) for k in mine)
    finally:
        bank.delete_adapter("check")


def test_linear_is_measured_against_the_exact_sum_and_the_gap_is_the_cross_terms(bank):
    sources, weights = ["lora-times_3", "lora-sort"], [0.5, 0.5]
    report = analysis.merge_report(bank, sources, weights, n=64, combination_type="linear")
    exact_sq = gap_sq = 0.0
    for layer in [m for m in bank.modules() if isinstance(m, LoraLinear) and m.has_phi(sources[0])]:
        # by hand: peft's linear is (sum sqrt(w s) B_i)(sum sqrt(w s) A_i); the mean of the updates sum w s B_i A_i
        f = [(w * layer.scaling[n]) ** 0.5 for n, w in zip(sources, weights)]
        B = sum(c * layer.lora_B[n].weight for c, n in zip(f, sources))
        A = sum(c * layer.lora_A[n].weight for c, n in zip(f, sources))
        exact = sum(c * c * layer.lora_B[n].weight @ layer.lora_A[n].weight for c, n in zip(f, sources))
        exact_sq += float((exact ** 2).sum())
        gap_sq += float(((B @ A - exact) ** 2).sum())
    gap = report["exact_sum"]
    assert gap["norm"] == pytest.approx(exact_sq ** 0.5, rel=1e-5)
    assert gap["gap"] == pytest.approx(gap_sq ** 0.5, rel=1e-5) and gap["gap"] > 0.5 * gap["norm"]
    twice = analysis.merge_report(bank, ["lora-times_3", "lora-times_3"], weights, n=64, combination_type="linear")
    # one phi twice at weights 1/2: linear gives twice its update, where the mean of the updates is itself
    assert twice["exact_sum"]["merged_norm"] == pytest.approx(2 * twice["exact_sum"]["norm"], rel=1e-5)
    assert twice["exact_sum"]["gap"] == pytest.approx(twice["exact_sum"]["norm"], rel=1e-5)
    assert twice["exact_sum"]["merged"]["times_3"] == 1.0  # the exact mean is the phi itself
    assert analysis.merge_report(bank, sources, weights, n=8, combination_type="cat")["exact_sum"] is None


def test_the_svd_curve_keeps_the_energy_of_the_exact_sum_rank_by_rank(bank):
    sources, weights = ["lora-times_3", "lora-complement", "lora-sort"], [0.4, 0.3, 0.3]
    curve = analysis.svd_curve(bank, sources, weights)
    updates = [analysis.phi_updates(bank, s) for s in sources]
    spectra = [torch.linalg.svdvals(sum(w * u[k] for w, u in zip(weights, updates))) ** 2 for k in updates[0]]
    total = sum(float(s.sum()) for s in spectra)
    assert [row["rank"] for row in curve] == [1, 2, 3]  # three rank-1 phi: the sum has rank 3
    for row in curve:
        assert row["energy"] == pytest.approx(sum(float(s[:row["rank"]].sum()) for s in spectra) / total, rel=1e-5)
    assert curve[-1]["energy"] == pytest.approx(1.0, abs=1e-6)
    bank.add_weighted_adapter(sources, weights, "check", combination_type="svd", svd_rank=2)
    try:
        for task in ("times_3", "sort"):
            assert curve[1]["exact"][task] == pytest.approx(plain_score(bank, "check", task, n=128), abs=1e-9)
    finally:
        bank.delete_adapter("check")


def test_a_merge_of_one_task_keeps_its_task_in_the_file_and_one_of_several_has_none(bank):
    report = analysis.merge_report(bank, ["lora-times_3", "lora-times_3"], [0.5, 0.5], n=64, combination_type="cat")
    assert report["merged"] == {"times_3": 1.0}
    loaded = PeftModel(peftcore.load_base())
    peftcore.load_adapter(loaded, "one", report["file"])
    two_tasks = analysis.merge_report(bank, ["lora-times_3", "lora-sort"], [1, 1], n=8)
    peftcore.load_adapter(loaded, "two", two_tasks["file"])
    assert loaded.adapter_task == {"one": "times_3"}


# ------------------------------------------------------------------ the Serve page
def test_the_serve_page_combines_scores_and_saves_the_merged_phi():
    at = open_page(SERVE)
    assert at.multiselect(key="combine_names").value == ["lora-complement", "lora-reverse_add_1"]
    at.multiselect(key="combine_names").set_value(["lora-times_3", "lora-sort"]).run()
    at.button(key="combine_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    table = next(t.value for t in at.table if "the merged phi" in t.value.columns)
    model, _ = library.load_library(peftcore.load_base())
    report = analysis.merge_report(model, ["lora-times_3", "lora-sort"], [0.5, 0.5], combination_type="svd")
    assert list(table["task"]) == ["times_3", "sort"]
    assert list(table["the merged phi"]) == [f"{100 * report['merged'][t]:.1f}%" for t in ("times_3", "sort")]
    assert "lora-times_3 100.0%" in table["each source on its own task"][0]
    chart = [c for c in at.get("plotly_chart") if "combine_curve" in c.proto.id]
    assert chart and json.loads(chart[0].proto.spec)["layout"]["xaxis"]["title"]["text"]

    at.selectbox(key="combine_type").set_value("linear").run()
    at.button(key="combine_go").click().run()
    words = " ".join(m.value for m in at.markdown)
    assert "plus the cross terms" in words and "the exact weighted sum of the updates has norm" in words

    at.button(key="combine_save").click().run()
    assert "Saved `merged-linear` to your bank." in [s.value for s in at.success]
    assert "merged-linear" in at.session_state["stored_ids"]

    at.selectbox(key="combine_weighting").set_value("own").run()
    at.text_input(key="combine_weights").input("0.7, lots").run()
    assert any("Weights: weights are numbers" in e.value for e in at.error)


def test_the_serve_page_offers_each_method_only_the_combinations_it_takes():
    at = open_page(SERVE)
    methods = at.selectbox(key="combine_method").options
    assert methods == ["LoRA", "IA3"]  # the methods whose phi combine, nothing else
    at.selectbox(key="combine_method").set_value("IA3").run()
    assert at.selectbox(key="combine_type").options == ["linear"]
    assert at.multiselect(key="combine_names").value == ["ia3-complement", "ia3-reverse_add_1"]
    at.button(key="combine_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]


# ------------------------------------------------------------------ a class merges its work
def test_the_teacher_merges_the_class_and_the_board_shows_it_beside_each_student(store_path):
    store = Store(store_path, base=peftcore.load_base())
    code, key = store.create_class("merging")
    for author, phi in (("Ada", "lora-times_3"), ("Bo", "lora-times_3"), ("Cy", "adapter-complement")):
        data = (LIBRARY_DIR / phi.split("-", 1)[0] / phi.split("-", 1)[1] / "adapter_model.safetensors").read_bytes()
        store.save_phi(store.mint_token("bank"), phi, data, class_code=code, author=author, eval_exact=1.0)
    student = open_page(CLASS, {"class": code})
    assert not any(b.key == "class_merge_go" for b in student.button)  # the teacher's, only
    teacher = open_page(CLASS, {"class": code})
    teacher.text_input(key="typed_teacher_key").input(key)
    teacher.button(key="use_teacher_key").click().run()
    assert teacher.selectbox(key="class_merge_method").options == ["LoRA (2 phi)"]
    teacher.button(key="class_merge_go").click().run()
    assert not teacher.exception, [e.value for e in teacher.exception]
    board = teacher.dataframe[0].value
    model = PeftModel(peftcore.load_base())
    for i in range(2):
        model.load_adapter(LIBRARY_DIR / "lora" / "times_3", f"s{i}")
    model.add_weighted_adapter(["s0", "s1"], [0.5, 0.5], "merged", combination_type="svd")
    want = {t: 100 * plain_score(model, "merged", t) for t in ("times_3", "complement")}
    assert list(board["class_merge"]) == pytest.approx([want["times_3"], want["times_3"], want["complement"]])
    teacher.button(key="class_merge_save").click().run()
    assert any("Saved `class-merge-svd`" in s.value for s in teacher.success)
    records = Store(store_path).list_phi(class_code=code)
    assert [(r.author, r.task) for r in records][-1] == ("class merge", "times_3")
    assert records[-1].eval_exact == pytest.approx(want["times_3"] / 100)


def test_the_crawler_presses_every_button_of_a_teacher_whose_class_has_phi(store_path):
    """The crawler's own walk of the Class page starts an empty class; here it starts as the
    teacher of a class with phi on its board, so that it reaches Merge the class and what follows."""
    from test_visitor import press_everything, settle
    store = Store(store_path, base=peftcore.load_base())
    code, key = store.create_class("crawled")
    for phi in ("lora-times_3", "lora-sort", "ia3-sort"):
        method, task = phi.split("-", 1)
        data = (LIBRARY_DIR / method / task / "adapter_model.safetensors").read_bytes()
        store.save_phi(store.mint_token("bank"), phi, data, class_code=code, author="Ada")
    at = open_page(CLASS, {"class": code})
    at.text_input(key="typed_teacher_key").input(key)
    at.button(key="use_teacher_key").click().run()
    settle(at, "entering teacher mode")
    pressed = press_everything(at, CLASS, "teacher of a class with phi")
    assert {"class_merge_go", "class_merge_save", "class_serve"} <= set(pressed), pressed


def test_a_phi_named_like_a_probe_is_never_taken_for_one(bank):
    """Measuring adds phi under names of its own and deletes them: never a visitor's phi that
    happens to bear such a name (an upload may)."""
    bank.load_adapter(LIBRARY_DIR / "lora" / "sort", "__probe_0__")
    try:
        before = state(bank)
        analysis.merge_report(bank, ["lora-times_3", "__probe_0__"], [1, 1], n=8, combination_type="cat")
        assert state(bank) == before and "__probe_0__" in bank.peft_config
    finally:
        bank.delete_adapter("__probe_0__")


def test_a_merge_of_several_tasks_is_listed_as_what_it_was_merged_from(bank, store_path):
    report = analysis.merge_report(bank, ["lora-times_3", "lora-sort"], [0.5, 0.5], n=8, combination_type="cat")
    store = Store(store_path, base=peftcore.load_base())
    rec = store.save_phi(store.mint_token("bank"), "both", report["file"])
    assert rec.task == "merge of sort + times_3"  # not "?": the file says what it came from
    model = PeftModel(peftcore.load_base())
    peftcore.load_adapter(model, "both", report["file"])
    assert model.adapter_merged_from["both"]["tasks"] == ["times_3", "sort"]
