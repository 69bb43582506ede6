"""A student's bank outlives the tab: its private link brings saved phi back into a new
session (a deliberate choice), a bad token is reported, and "delete my saved phi" empties the
store (AppTest, against the test session's real store file)."""
import os


import peftcore
from apptest import app, open_page
from peftcore import library
from peftcore.service.store import Store


def open_serve(query):
    """The serve page opened from a private bank link, its bank taken on purpose."""
    at = open_page("app_pages/serve.py", query)
    if "bank" in query:
        at.button(key="take_offered_bank").click().run()
    return at


def test_saved_phi_come_back_with_the_link_and_can_be_deleted(base):
    store = Store(os.environ["PEFT_STORE"], base=base)
    token = store.mint_token("bank")
    name, directory = library.entries()[0]
    model = peftcore.PeftModel.from_pretrained(base, directory)
    store.save_phi(token, "my-phi", peftcore.adapter_to_bytes(model, "default"))

    at = open_serve({"bank": token})  # a new session: a refresh, a new tab, a restarted server
    bank = at.session_state["bank:" + peftcore.resolve_device("auto")]
    assert "my-phi" in bank.peft_config
    assert any(f"?bank={token}" in c.value for c in at.sidebar.code)  # the private link

    at.sidebar.button(key="delete_mine").click().run()
    assert not at.exception
    assert store.list_phi(owner=token) == []
    assert "my-phi" not in bank.peft_config
    assert "my-phi" not in open_serve({"bank": token}).session_state[
        "bank:" + peftcore.resolve_device("auto")].peft_config


def test_a_malformed_bank_token_is_reported_not_fatal():
    at = app()
    at.query_params["bank"] = "not a token!"
    at.run()
    assert not at.exception
    assert any("not one this server made" in t.value for t in at.toast)
    assert "bank" not in at.query_params


def test_a_saved_phi_of_a_retired_task_stays_in_the_bank_and_is_not_served(base):
    """add_5 left the task suite (times_3 took its place, BENCHMARKS.md): a phi a student
    saved on it before the upgrade still comes back with their link, and the pages that list
    the bank open and press without error; only serving it (a task with no inputs) is off."""
    assert "add_5" not in peftcore.TASKS
    store = Store(os.environ["PEFT_STORE"], base=base)
    token = store.mint_token("bank")
    model = peftcore.PeftModel.from_pretrained(base, dict(library.entries())["lora-times_3"])
    model.adapter_task["default"] = "add_5"
    store.save_phi(token, "old-phi", peftcore.adapter_to_bytes(model, "default"))

    at = open_serve({"bank": token})
    bank = at.session_state["bank:" + peftcore.resolve_device("auto")]
    assert bank.adapter_task["old-phi"] == "add_5"
    chosen = at.multiselect(key="serve_names")
    assert not any("old-phi" in o for o in chosen.options) and "old-phi" not in chosen.value
    at.button(key="serve_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    at.switch_page("app_pages/classroom.py").run()
    assert not at.exception, [e.value for e in at.exception]
