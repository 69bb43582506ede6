"""The Class page with AppTest against a real store file: a teacher starts a class, two
students join with the code and each saves a phi, the board lists both, the storage chart
prices them and one mixed batch answers for both; bad links get clear messages."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peftcore.service.store import Store  # noqa: E402
from ui import plain  # noqa: E402
from apptest import app

PAGE = str(ROOT / "app_pages" / "classroom.py")


def page(query=None, bank=None):
    """The Class page in a fresh session; `bank`: the bank token this browser already holds."""
    at = app(PAGE)
    if bank:
        at.session_state["bank_token"] = bank
    if query:
        at.query_params.update(query)
    at.run()
    assert_clean(at)
    return at


def assert_clean(at):
    assert not at.exception, [e.value for e in at.exception]


def texts(at):
    return " ".join(m.value for kind in ("markdown", "caption", "success", "error", "warning", "info", "header")
                    for m in at.get(kind)) + " " + " ".join(t.value for t in at.toast)


def student_saves(code, author, phi):
    at = page({"class": code})
    at.text_input(key="class_author").input(author)
    at.selectbox(key="class_phi").set_value(phi)
    at.button(key="class_save").click().run()
    assert_clean(at)
    assert f"Saved `{phi}`" in texts(at), texts(at)
    return at


def test_a_class_end_to_end(store_path):
    teacher = page()
    teacher.text_input(key="class_name").input("Monday group")
    teacher.button(key="create_class").click().run()
    assert_clean(teacher)
    code = teacher.query_params["class"]
    code = code[0] if isinstance(code, list) else code
    key = teacher.code[0].value  # shown once, to the teacher
    assert Store(store_path).is_teacher(code, key)
    assert f"join code {code}" in texts(teacher)

    ada = student_saves(code, "Ada", "lora-times_3")
    bo = student_saves(code, "Bo", "adapter-complement")
    tokens = {s.session_state["bank_token"] for s in (ada, bo)}
    assert len(tokens) == 2  # each student has a bank token of their own
    assert not any(key in texts(s) for s in (ada, bo))  # students never see the teacher key

    teacher.run()
    board = teacher.dataframe[0].value
    assert list(board["student"]) == ["Ada", "Bo"] and list(board["task"]) == ["times_3", "complement"]
    assert list(board["method"]) == ["LoRA", "Adapter"]
    recorded = json.loads((ROOT / "peftcore" / "library" / "index.json").read_text())  # measured at build time
    assert list(board["exact"]) == pytest.approx([100 * recorded[n]["eval_exact"] for n in board["name"]])
    chart = [c for c in teacher.get("plotly_chart") if "class_storage" in c.proto.id]
    spec = json.loads(chart[0].proto.spec)
    assert spec["data"][1]["y"] == [0, 1, 2]  # T full copies
    peft = spec["data"][0]["y"]
    assert peft[0] == 1 and 1 < peft[1] < peft[2] < 1.3  # 1 + sum p of the measured files

    teacher.button(key="class_serve").click().run()
    assert_clean(teacher)
    table = texts(teacher)
    assert plain("Ada: lora-times_3 (times_3)", 80) in table  # names are plain text in the table's markdown
    assert plain("Bo: adapter-complement (complement)", 80) in table
    assert "equal one-request-at-a-time" in table

    # a student deletes only their own; the teacher deletes any
    bo.run()
    options = bo.selectbox(key="class_delete_id").options
    assert len(options) == 1 and "Bo" in options[0]
    teacher.selectbox(key="class_delete_id").set_value(Store(store_path).list_phi(class_code=code)[1].id)
    teacher.button(key="class_delete").click().run()
    assert_clean(teacher)
    assert list(teacher.dataframe[0].value["student"]) == ["Ada"]
    teacher.button(key="close_class").click().run()
    assert "closed" in texts(teacher)


def test_bad_links_get_messages_not_exceptions(store_path):
    for query, message in [({"class": "nonsense!"}, "not a class code"), ({"class": "ZZZZZZ"}, "no class has"),
                           ({"class": "x" * 500}, "not a class code")]:
        at = page(query)
        assert message in texts(at), texts(at)
    at = page()
    at.text_input(key="join_code").input("nope")
    at.button(key="join_class").click().run()
    assert_clean(at)
    assert "Cannot join" in texts(at)


def test_a_refresh_and_a_restart_keep_the_class(store_path):
    code, key = Store(store_path).create_class("kept")
    ada = student_saves(code, "Ada", "lora-times_3")
    token = ada.session_state["bank_token"]
    again = page({"class": code}, bank=token)  # a fresh session of the same browser (its bank cookie)
    assert list(again.dataframe[0].value["yours"]) == [True]
    assert page({"class": code}).dataframe[0].value["yours"].tolist() == [False]  # another browser
