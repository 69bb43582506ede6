"""The class lesson as a room meets it (issue 30, items 7, 9, 10 and 11; AppTest): the save box
offers the student's own phi, the last saved selected, never a library one by default; the
header counts a save at once; long board names wrap whole; teacher mode shows the key once,
keeps a handle and can be left; "Serve all" runs on a bank of its own (no lock another session
waits on) and times a big class once; an exercise link hides what it hides everywhere and
shows no teacher tool; a visitor's text is a literal on these pages."""
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import peftcore  # noqa: E402
import ui  # noqa: E402
from apptest import app, open_page, wait_for  # noqa: E402
from peftcore import analysis, library  # noqa: E402
from peftcore.service import store as store_mod  # noqa: E402
from peftcore.service.store import Store  # noqa: E402

CLASS_PAGE = str(ROOT / "app_pages" / "classroom.py")
LONG_NAME = "a-very-long-phi-name-that-a-student-typed-to-say-what-it-does-x"  # 63 characters


def assert_clean(at):
    assert not at.exception, [e.value for e in at.exception]


def texts(at):
    kinds = ("markdown", "caption", "success", "error", "warning", "info", "header", "code")
    return " ".join(m.value for kind in kinds for m in at.get(kind))


def class_page(code, seed=None):
    at = app(CLASS_PAGE)
    at.query_params["class"] = code
    if seed is not None:
        at.session_state["seed"] = seed
    at.run()
    assert_clean(at)
    return at


def train_and_save(at, steps, name=None):
    """A short LoRA run on the train page, saved to the bank (as `name`, if given); the name saved."""
    at.slider(key="steps-LoRA").set_value(steps).run()
    at.button(key="train_go").click().run()
    wait_for(at, lambda at: any(s.value.startswith("Results on") for s in at.header))
    run_id = at.session_state["groups"]["train"][0]
    box = at.text_input(key=f"name-{run_id}")
    if name:
        box.input(name)
    saved = name or box.value
    at.button(key=f"save-{run_id}").click().run()
    assert_clean(at)
    assert any(saved in s.value for s in at.success), texts(at)
    return saved


def in_class(at, code):
    """The same session (the same bank) opens the Class page of `code`."""
    at.query_params["class"] = code
    at.switch_page("app_pages/classroom.py").run()
    assert_clean(at)
    return at


# ------------------------------------------------------------------ item 10: the save box
def test_the_save_box_offers_the_students_own_phi_the_last_saved_selected(store_path):
    code, _ = Store(store_path).create_class("Room 10")
    at = open_page("app_pages/train.py")
    first = train_and_save(at, 10)
    second = train_and_save(at, 20, "my-second-phi")  # another run: a second phi of their own
    in_class(at, code)
    box = at.selectbox(key="class_phi")
    assert box.value == second  # the last one saved, not the first library phi
    own = [o for o in box.options if not o.startswith("library: ")]
    assert own == [second, first]  # theirs first, newest first
    assert {o.removeprefix("library: ") for o in box.options} - set(own) == {n for n, _ in library.entries()}

    assert "0 phi in the class" in texts(at)
    at.text_input(key="class_author").input("Ada")
    at.button(key="class_save").click().run()  # the default click
    assert_clean(at)
    assert "1 phi in the class" in texts(at)  # the header counts the save in the same run
    assert list(at.dataframe[0].value["name"]) == [second]


def test_without_a_phi_of_their_own_the_box_says_so_and_selects_no_library_phi(store_path):
    code, _ = Store(store_path).create_class("Room 10b")
    at = class_page(code)
    assert "train one on *Train a sliver* and press **Save to my bank**" in texts(at)
    box = at.selectbox(key="class_phi")
    assert box.value is None and all(o.startswith("library: ") for o in box.options)
    at.button(key="class_save").click().run()  # nothing chosen: told, nothing saved
    assert "Choose a phi" in texts(at) and "0 phi in the class" in texts(at)
    at.selectbox(key="class_phi").select("lora-times_3").run()  # a library phi, chosen deliberately
    at.button(key="class_save").click().run()
    assert_clean(at)
    assert "1 phi in the class" in texts(at)


def test_long_board_names_wrap_whole(store_path):
    store = Store(store_path, base=peftcore.load_base())
    data = (library.LIBRARY_DIR / "lora" / "times_3" / "adapter_model.safetensors").read_bytes()
    short, long = store.create_class("Room 10c")[0], store.create_class("Room 10d")[0]
    store.save_phi(bank_token(store), "short", data, class_code=short, author="Al")
    store.save_phi(bank_token(store), LONG_NAME, data, class_code=long, author="Ada Augusta King Lovelace")
    assert not class_page(short).dataframe[0].proto.row_height  # one line each: the grid's own rows
    board = class_page(long).dataframe[0]
    assert board.proto.row_height > 64  # the grid wraps a cell's text only in rows taller than 64 px
    assert list(board.value["name"]) == [LONG_NAME]


def bank_token(store):
    """A bank token the store accepts (minted by the store, where it mints them)."""
    return store.mint_token("bank") if hasattr(store, "mint_token") else store_mod.new_token()


# ------------------------------------------------------------------ teacher mode on the page
def test_teacher_mode_shows_the_key_once_keeps_a_handle_and_can_be_left(store_path):
    at = app(CLASS_PAGE)
    at.run()
    at.text_input(key="class_name").input("Room T")
    at.button(key="create_class").click().run()
    assert_clean(at)
    code = at.query_params["class"]
    code = code[0] if isinstance(code, list) else code
    key = at.code[0].value
    assert Store(store_path).is_teacher(code, key)  # the key, shown once from what create_class returned
    at.button(key="hide_key").click().run()
    kept = at.session_state._state.filtered_state  # everything the session holds
    assert key not in texts(at) and key not in str(kept)  # kept nowhere once copied
    assert at.button(key="close_class")  # teacher mode holds on a handle

    ada = class_page(code)
    ada.selectbox(key="class_phi").select("lora-times_3").run()
    ada.button(key="class_save").click().run()
    at.run()
    assert at.selectbox(key="class_delete_id").label == "Delete a phi (teacher)"
    at.button(key="class_delete").click().run()  # the teacher deletes a student's phi with the handle
    assert_clean(at)
    assert Store(store_path).list_phi(class_code=code) == []

    assert "On a shared computer, leave teacher mode before you go" in texts(at)
    at.button(key="leave_teacher").click().run()
    assert_clean(at)
    assert not [b for b in at.button if b.key == "close_class"]  # a student's page now
    at.text_input(key="typed_teacher_key").input("a-wrong-key-of-the-right-shape-123")
    at.button(key="use_teacher_key").click().run()
    assert "not this class's teacher key" in texts(at)
    at.text_input(key="typed_teacher_key").input(key)
    at.button(key="use_teacher_key").click().run()
    at.button(key="close_class").click().run()  # the key brings teacher mode back; the class closes
    assert_clean(at)
    assert "closed" in texts(at)


# ------------------------------------------------------------------ item 9: Serve all
def test_serve_all_runs_on_a_bank_of_its_own_and_times_a_big_class_once(store_path, monkeypatch):
    store = Store(store_path, base=peftcore.load_base())
    code, _ = store.create_class("Room 9")
    model, _ = library.load_library(peftcore.load_base())
    token, names = bank_token(store), [n for n, _ in library.entries()]
    for i in range(30):  # distinct files: each library phi nudged a little per copy
        name = names[i % len(names)]
        tensor = model.adapter_state_dict(name)[sorted(model.adapter_state_dict(name))[0]]
        with torch.no_grad():
            tensor.view(-1)[0] += 1e-6
        store.save_phi(token, f"{name}-{i}", peftcore.adapter_to_bytes(model, name), class_code=code)
    calls, real = [], analysis.serve_report

    def recording(model, *args, **kwargs):
        calls.append((model, kwargs.get("repeats")))  # the model object kept: its id cannot be reused
        return real(model, *args, **kwargs)
    monkeypatch.setattr(analysis, "serve_report", recording)
    pages = []
    for seed in (0, 1):  # two sessions with their own seeds: one report for the room
        pages.append(class_page(code, seed=seed))
        pages[-1].button(key="class_serve").click().run(timeout=300)
        assert_clean(pages[-1])
    assert len(calls) == 1  # bounded: once per state of the class, whatever the seed
    assert [repeats for _, repeats in calls] == [1]  # 30 requests per pass: one timed pass, not three
    assert all("30 rows" in texts(at) and "one timing each" in texts(at) for at in pages)


# ------------------------------------------------------------------ item 11: exercise links
def all_text(at):
    """Every text the page shows, help texts and progress lines included."""
    out = [texts(at)]
    for kind in ("metric", "progress", "expander", "select_slider", "slider", "selectbox", "pills"):
        for e in at.get(kind):
            proto = e.proto
            out += [str(getattr(e, "label", "")), str(getattr(e, "value", "")),
                    getattr(proto, "help", ""), getattr(proto, "text", "")]
    return " ".join(out)


def test_an_exercise_link_hides_the_learning_rate_everywhere_and_shows_no_teacher_tool():
    at = open_page("app_pages/train.py", {"method": "LoRA", "lr": "0.005", "steps": "10", "only": "r",
                                          "hide": "lr,steps"})
    assert not [e for e in at.expander if "Copy link for the class" in e.label]
    assert "link_only" not in [p.key for p in at.get("pills")]
    at.button(key="train_go").click().run()
    wait_for(at, lambda at: any(s.value.startswith("Results on") for s in at.header))
    run = ui.get_manager().runs[at.session_state["groups"]["train"][0]]
    assert run.kwargs["lr"] == 0.005 and run.kwargs["steps"] == 10  # the link's hidden values are used...
    shown = all_text(at)
    assert "0.005" not in shown and "Learning rate" not in shown and not re.search(r"\blr\b", shown)  # ...nor shown
    assert not re.search(r"\b10 steps", shown)

    teacher = open_page("app_pages/train.py")  # a page opened without an exercise link keeps the tool
    assert [e for e in teacher.expander if "Copy link for the class" in e.label]
    assert re.search(r"\blr \d", all_text(teacher))


def test_a_hidden_step_budget_is_not_in_the_progress_line():
    at = open_page("app_pages/train.py", {"method": "LoRA", "steps": "10", "only": "r", "hide": "steps"})
    at.button(key="train_go").click().run()
    wait_for(at, lambda at: any(s.value.startswith("Results on") for s in at.header))
    assert not [p for p in at.get("progress") if "/10" in p.proto.text]


# ------------------------------------------------------------------ item 7: a visitor's text
def outside_code_spans(markdown):
    return re.sub(r"(`+)(.+?)\1", "", markdown)


def test_visitor_text_on_the_class_and_train_pages_is_literal(store_path):
    name = "www.evil.example"  # an autolink, were it read as markdown
    code, _ = Store(store_path).create_class(name)
    at = class_page(code)
    header = at.header[0].value
    assert name in header and "evil" not in outside_code_spans(header)

    link = "[x](http://evil.example/a)"
    at = open_page("app_pages/train.py", {"only": link, "hide": "![i](http://evil.example/i.png)"})
    warning = " ".join(w.value for w in at.warning)
    assert "evil.example" in warning and "evil" not in outside_code_spans(warning)
