"""Every control a visitor can press, on every page, as a visitor meets it.

A crawler under AppTest opens each page in a fresh session, switches every mode (each radio
option, each checkbox and toggle), and in each mode presses every enabled button it finds,
again and again as new ones appear (Train, then Stop, then Save...), waiting for whatever a
press starts to finish. No press may raise, no run may fail, and every chart drawn on the
way has a title on each of its axes. New pages and buttons are covered without anyone
remembering to add them: the pages come from app.py, the buttons from the page itself.
"""
import json
import re
import time

import pytest

from apptest import POLL_S, ROOT, app, open_page
from peftcore.presets import PRESETS

PAGES = re.findall(r'st\.Page\("(app_pages/\w+\.py)"', (ROOT / "app.py").read_text())
# Text boxes a press needs filled to go on (a class needs a name); the rest get "Ada".
TYPED = {"serve_digits": "12345678", "join_code": "abc-234", "typed_teacher_key": "not-the-key"}
# pressed after everything else: first what deletes or closes, then what leaves the page's state
LATER = (re.compile(r"delete|close|remove", re.I), re.compile(r"leave|reset", re.I))
MAX_PRESSES = 40


def test_the_crawler_finds_every_page():
    assert len(PAGES) == 5 and all((ROOT / p).exists() for p in PAGES)


def fresh(page):
    at = open_page(page)
    settle(at, f"opening {page}")
    return at


def settle(at, doing):
    """Once the visitor's runs have ended, rerun the page (AppTest does not fire run_every;
    the press's own rerun drew the live panel of the runs it started), then check what the
    visitor sees. Not a rerun per poll meanwhile: on a busy machine a run lasts longer, and
    reruns of a page that only redraw the same panel were most of this module's work."""
    deadline, reran = time.time() + 240, False
    while any(b.key and b.key.startswith("stop-") for b in at.button):
        assert time.time() < deadline, f"{doing}: runs did not end"
        if unfinished_runs(at):
            time.sleep(0.1)
            continue
        if reran:  # ended, yet the page still offers Stop: poll as the browser does
            time.sleep(POLL_S)
        at.run()
        reran = True
    assert not at.exception, (doing, [e.value for e in at.exception])
    import ui
    # a run that failed, or a panel that failed to draw (ui.panel: the rest of the page still draws)
    failed = [e.value for e in at.error if " failed" in e.value or ui.PANEL_FAILED in e.value]
    assert not failed, (doing, failed)
    for fig in charts(at):
        check_axis_titles(fig, doing)


def unfinished_runs(at):
    """The visitor's runs (of every group on its page) that have not ended yet."""
    import ui
    runs = ui.get_manager().runs
    groups = at.session_state["groups"] if "groups" in at.session_state else {}
    return [runs[i] for ids in groups.values() for i in ids if i in runs and not runs[i].finished]


def charts(at):
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def check_axis_titles(fig, doing):
    """Every axis a trace plots on has title.text (plotly.js ignores a plain-string title)."""
    layout = fig["layout"]
    used = {t.get("xaxis", "x") for t in fig["data"]} | {t.get("yaxis", "y") for t in fig["data"]}
    for ref in used:
        axis = layout.get(f"{ref[0]}axis{ref[1:]}", {})
        title = axis.get("title")
        assert isinstance(title, dict) and title.get("text"), (doing, ref, title)


def name(button):
    return button.key or button.label


def fill_text(at):
    for box in at.text_input:
        if not box.value and not box.proto.disabled:
            box.input(TYPED.get(box.key, "Ada"))


def press_everything(at, page, mode):
    """Press every enabled button once, newest first found, destructive ones last."""
    pressed = []
    for _ in range(MAX_PRESSES):
        fill_text(at)
        todo = [b for b in at.button if name(b) not in pressed and not b.proto.disabled]
        if not todo:
            return pressed
        button = min(todo, key=lambda b: [bool(p.search(b.label)) for p in LATER[::-1]])
        pressed.append(name(button))
        button.click().run()
        settle(at, f"{page} ({mode}): pressing {button.label!r}")
    raise AssertionError(f"{page} ({mode}): still new buttons after {MAX_PRESSES} presses: {pressed}")


def bounded(at):
    """Every slider at its smallest value: the shortest runs, the smallest batches."""
    for slider in at.slider:
        if not slider.proto.disabled:
            slider.set_value(slider.min)
    at.run()


def modes(page):
    """The page as it opened, and (description, set-up) for it as it opens and for each other
    radio option, checkbox and toggle state it has."""
    at = fresh(page)
    found = [("as it opens", lambda at: None)]
    for radio in at.radio:
        for option in radio.options:
            if option != radio.value:
                found.append((f"{radio.key}={option}", lambda at, k=radio.key, o=option: at.radio(key=k).set_value(o)))
    for kind in ("checkbox", "toggle"):
        for box in getattr(at, kind):
            found.append((f"{box.key} flipped", lambda at, k=box.key, v=box.value, kind=kind:
                          getattr(at, kind)(key=k).set_value(not v)))
    return at, found


@pytest.mark.parametrize("page", PAGES)
def test_every_button_in_every_mode(page):
    pressed_anywhere = set()
    opened, found = modes(page)
    for mode, set_up in found:
        at, opened = (fresh(page) if opened is None else opened), None  # the first mode: the page as it opened
        set_up(at)
        bounded(at)
        settle(at, f"{page}: switching to {mode}")
        pressed_anywhere |= set(press_everything(at, page, mode))
    assert pressed_anywhere, f"{page} has no button to press"


# ------------------------------------------------------------------ what a visitor met (issue 13)
def texts(at):
    return " ".join(m.value for kind in ("markdown", "caption", "success", "error", "warning", "info", "header")
                    for m in at.get(kind)) + " " + " ".join(t.value for t in at.toast)


def test_the_random_base_run_trains_on_the_random_base_and_is_never_joined_to_the_pretrained_one():
    import ui
    at = fresh("app_pages/inside.py")
    at.slider(key="pretrain_steps").set_value(20)
    at.button(key="pretrain_go").click().run()
    settle(at, "Train both")
    pretrained, random_ = (ui.get_manager().runs[i] for i in at.session_state["groups"]["pretraining"])
    assert pretrained is not random_ and pretrained.key != random_.key
    assert (pretrained.label, random_.label) == ("LoRA, pretrained base", "LoRA, random base")
    assert random_.model.base_fingerprint == peftcore_fingerprint(ui.get_random_base("cpu"))
    assert pretrained.model.base_fingerprint == peftcore_fingerprint(ui.get_base("cpu"))


def test_the_inside_page_says_why_a_random_base_learns_sort_but_no_other_task():
    from peftcore.presets import robustness
    at = fresh("app_pages/inside.py")
    for task, why in [("times_3", "depend on where each digit is"), ("sort", "depends only on which digits are present")]:
        at.selectbox(key="pretrain_task").set_value(task).run()
        caption = next(c.value for c in at.caption if "random base's attention" in c.value)
        assert why in caption and f"on {task}'s inputs" in caption
        assert "(100% of an even spread's entropy" in caption  # measured now (peftcore.analysis.attention_spread)
        for base in ("pretrained", "random base"):
            assert f"{100 * robustness('LORA', task, base)['median']:.1f}%" in caption


def test_the_inside_page_shows_the_skills_the_base_learned_and_the_cells_it_never_saw():
    import math

    import peftcore
    from peftcore.pretrain import first_loss
    at = fresh("app_pages/inside.py")
    grid = next(t.value for t in at.table if "routing" in t.value.columns)
    cells = {(row["routing"], m): row[m] for _, row in grid.iterrows() for m in peftcore.DIGIT_MAPS}
    assert set(cells) == set(peftcore.skill_grid())
    for (routing, digit_map), text in cells.items():
        task = peftcore.skill_grid()[routing, digit_map]
        assert text == (f"{task.name}: held out" if task.name in peftcore.TASKS else f"{task.name}: 100%"), text
    caption = next(c.value for c in at.caption if "nats per answer digit" in c.value)
    for name, loss in first_loss(peftcore.load_base()).items():
        assert f"{name} {loss:.2f}" in caption
    assert f"ln 10 = {math.log(10):.2f}" in caption


def peftcore_fingerprint(model):
    import peftcore
    return peftcore.fingerprint(model)


def test_the_bank_and_the_class_follow_the_visitor_across_pages_and_a_reset():
    """The class follows in the link; the bank in the session (and a cookie), never the link."""
    from peftcore.service.store import Store
    import os
    store = Store(os.environ["PEFT_STORE"])
    code, _ = store.create_class("follows")
    token = store.mint_token("bank")
    at = app()
    at.session_state["bank_token"] = token
    at.query_params.update({"class": code})
    at.run()
    for page in PAGES:
        at.query_params.clear()  # what the sidebar's page link does to the URL
        at.switch_page(page).run()
        assert not at.exception
        assert at.query_params["class"] == code and "bank" not in at.query_params, page
        assert at.session_state["bank_token"] == token
    at.sidebar.button[-1].click().run()  # "Reset my session"
    assert "Reset my session" == at.sidebar.button[-1].label
    assert at.query_params["class"] == code and at.session_state["bank_token"] == token
    at.switch_page("app_pages/classroom.py").run()
    at.button(key="leave_class").click().run()
    assert "class" not in at.query_params and at.session_state["bank_token"] == token


def test_a_wrong_teacher_key_says_so_and_a_join_code_in_any_case_joins():
    from peftcore.service.store import Store
    import os
    code, _ = Store(os.environ["PEFT_STORE"]).create_class("cases")
    at = fresh("app_pages/classroom.py")
    at.text_input(key="join_code").input(f" {code.lower()[:3]}-{code[3:].title()} ")
    at.button(key="join_class").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.query_params["class"] == code
    at.text_input(key="typed_teacher_key").input("a-wrong-key-of-the-right-shape-123")
    at.button(key="use_teacher_key").click().run()
    assert "not this class's teacher key" in texts(at)


def test_words_mean_one_thing_and_count_what_they_say():
    at = fresh("app_pages/train.py")
    seed_note = [c.value for c in at.caption if "measured over seeds" in c.value][0]
    assert "solve" not in seed_note and "reaches 90%" in seed_note  # "solved" is stop-when-solved's 99% only
    at.switch_page("app_pages/serve.py").run()
    stored = [m.value for m in at.markdown if "stored as one base" in m.value][0]
    bank = at.session_state["bank:cpu"]
    n, k = len(bank.peft_config), len(set(bank.adapter_task.values()))
    assert f"**{n} phi** for {k} tasks" in stored and f"The same {n} fine-tunes as whole models" in stored
    at.switch_page("app_pages/storage.py").run()
    assert any("from the library shipped with the app, 0 you saved" in c.value for c in at.caption)


def test_the_full_fine_tuning_card_says_what_happened_and_a_saved_phi_is_served_by_default():
    at = fresh("app_pages/train.py")
    at.radio(key="mode").set_value("Race").run()
    at.pills(key="race_methods").set_value(["LoRA", "Full fine-tuning"])
    at.slider(key="race_steps").set_value(10)
    at.button(key="train_go").click().run()
    settle(at, "a race")
    cards = texts(at)
    assert "private **copy**" in cards and "weights changed" in cards
    assert cards.count("never received a gradient") == 1  # LoRA's card only
    lora = at.session_state["groups"]["train"][0]
    at.button(key=f"save-{lora}").click().run()
    saved = at.text_input(key=f"name-{lora}").value
    at.switch_page("app_pages/serve.py").run()
    assert saved in at.multiselect(key="serve_names").value


@pytest.mark.panel_fails
def test_a_failing_panel_says_so_briefly_and_the_rest_of_the_page_works(monkeypatch):
    import ui

    def broken():
        raise RuntimeError("/srv/secret/path/store.py line 12: boom")
    at = fresh("app_pages/serve.py")
    monkeypatch.setattr(ui, "bank_rows", broken)
    at.run()
    assert not at.exception
    shown = texts(at)
    assert "Your bank could not be shown" in shown and "/srv/secret" not in shown and "boom" not in shown
    assert at.get("file_uploader")  # the page goes on below the failed panel


def test_the_server_shows_visitors_no_error_details():
    import tomllib
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "none"


def test_every_method_trains_from_its_own_controls_in_one_method_mode():
    """The crawler presses Train with the default method; here each method is picked in turn,
    its own controls drawn, a short run started and its result card shown."""
    import ui
    for view in ui.method_views():
        at = fresh("app_pages/train.py")
        at.selectbox(key="method").set_value(view.name).run()
        settle(at, f"picking {view.name}")
        assert at.select_slider(key=f"lr-{view.name}").value == PRESETS[view.peft_type].train["lr"], view.name
        at.slider(key=f"steps-{view.name}").set_value(10)
        at.button(key="train_go").click().run()
        settle(at, f"training {view.name}")
        assert any(s.value == "Results on times_3" for s in at.header), view.name
        assert at.get("download_button"), view.name
