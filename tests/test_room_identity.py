"""A real room (issue 30): a link never hands a bank over, a token the server did not mint is
refused, the per-address run cap is a setting that covers loopback, and text a visitor
controls renders as a literal (AppTest against the test session's real store; the browser
side of the same rules is tests/test_room_browser.py)."""
import os

import pytest

import peftcore

from apptest import ROOT, app, open_page
from peftcore import library
from peftcore.service.store import Store

DEVICE = peftcore.resolve_device("auto")


@pytest.fixture(scope="module")
def store(base):
    return Store(os.environ["PEFT_STORE"], base=base)


def saved_bank(store, base, name):
    """A bank the server minted, holding one saved phi called `name`."""
    token = store.mint_token("bank")
    model = peftcore.PeftModel.from_pretrained(base, library.entries()[0][1])
    store.save_phi(token, name, peftcore.adapter_to_bytes(model, "default"))
    return token


def open_with_bank(token, page, query=None):
    """A browser whose own bank is `token` (its cookie) opens `page` with `query` in the link."""
    at = app()
    at.session_state["bank_token"] = token
    at.query_params.update(query or {})
    at.run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def bank_of(at):
    return at.session_state[f"bank:{DEVICE}"].peft_config


def test_a_bank_link_offers_the_bank_and_never_takes_the_visitor_over(store, base):
    ada = saved_bank(store, base, "adas-phi")
    bo = open_with_bank(saved_bank(store, base, "bos-phi"), "app_pages/serve.py", {"bank": ada})  # Ada's private link
    assert "bank" not in bo.query_params  # gone from the address bar: it is not pasted on
    assert bo.session_state["bank_token"] != ada
    assert "bos-phi" in bank_of(bo) and "adas-phi" not in bank_of(bo)
    assert any("This link opens another bank" in w.value for w in bo.warning)
    bo.button(key="keep_my_bank").click().run()
    assert not any("another bank" in w.value for w in bo.warning) and "bos-phi" in bank_of(bo)

    bo.query_params["bank"] = ada
    bo.run()
    bo.button(key="take_offered_bank").click().run()  # a deliberate choice: his own bank, on a new device
    assert bo.session_state["bank_token"] == ada and "adas-phi" in bank_of(bo)


def test_no_page_puts_the_bank_in_the_address_bar_and_the_private_link_is_offered_in_its_place(store, base):
    token = saved_bank(store, base, "mine")
    at = open_with_bank(token, "app_pages/serve.py")
    for page in ["app_pages/storage.py", "app_pages/train.py", "app_pages/serve.py", "app_pages/inside.py",
                 "app_pages/classroom.py"]:
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        assert "bank" not in at.query_params, page
    assert any(f"bank={token}" in c.value for c in at.sidebar.code)  # the private link, deliberately shown


@pytest.mark.parametrize("forged", ["A" * 22, "A" * 44, "not a token!"])
def test_a_bank_the_server_did_not_mint_is_refused_with_a_message(forged):
    at = app()
    at.query_params["bank"] = forged
    at.run()
    assert not at.exception and any("not one this server made" in t.value for t in at.toast)
    assert "bank" not in at.query_params and at.session_state["bank_token"] is None


def test_a_legacy_bank_that_holds_phi_still_opens(store, base):
    """Banks made before tokens were signed keep their phi: a 22-character token is accepted
    only where the store already holds phi of it (so 22 made-up characters open nothing)."""
    from peftcore.service.store import new_token
    legacy = new_token()
    model = peftcore.PeftModel.from_pretrained(base, library.entries()[0][1])
    store.save_phi(legacy, "old", peftcore.adapter_to_bytes(model, "default"))
    assert store.token_ok(legacy, "bank") and not store.token_ok(new_token(), "bank")


def test_the_owner_id_is_minted_and_signed_by_the_server(store):
    at = open_page("app_pages/train.py")
    me = at.session_state["owner"]
    assert store.token_ok(me, "owner") and not store.token_ok(me, "bank")


def test_the_per_address_cap_is_a_setting_that_covers_loopback(monkeypatch):
    import ui
    monkeypatch.setenv(ui.PER_ADDRESS_ENV, "0")
    assert ui.per_address_cap() is None
    monkeypatch.setenv(ui.PER_ADDRESS_ENV, "30")
    assert ui.per_address_cap() == 30
    monkeypatch.setenv(ui.PER_ADDRESS_ENV, "lots")
    assert ui.per_address_cap() == ui.PER_ADDRESS_DEFAULT
    monkeypatch.delenv(ui.PER_ADDRESS_ENV)
    assert ui.per_address_cap() == 8

    # visitors on loopback (a same-host proxy that sends no X-Forwarded-For) share one address,
    # and its cap: their runs were started with no address at all, so no cap applied
    at = open_page("app_pages/train.py")
    at.button(key="train_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    runs = [ui.get_manager().runs[i] for i in at.session_state["groups"]["train"]]
    assert runs and all(set(r.clients.values()) == {"loopback"} for r in runs)
    for run in runs:
        ui.get_manager().stop(run, at.session_state["owner"])


@pytest.mark.parametrize("text", ["[click](http://evil.example/x)", "![img](http://evil.example/i.png)",
                                  "www.evil.example", "`code`", "``", "**bold** <b>x</b>"])
def test_visitor_text_is_a_literal_code_span(text):
    """Markdown reads nothing inside a code span: no link, image, autolink or formatting."""
    from ui import literal
    out = literal(text)
    fence = out[:len(out) - len(out.lstrip("`"))]
    body = out[len(fence):-len(fence)]
    assert out.endswith(fence) and "`" * len(fence) not in body
    assert body.strip(" ") == text


def test_the_app_listens_on_loopback_unless_the_operator_says_so():
    """`streamlit run app.py` (the README's first command): Streamlit's own default is every
    interface; the project's config keeps a laptop's app off the school network."""
    import subprocess
    import sys
    import time
    import urllib.request

    import psutil

    from harness.servers import free_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                             "--server.port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "the app did not start"
                time.sleep(0.5)
        addresses = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert addresses and addresses <= {"127.0.0.1", "::1"}, addresses
    finally:
        proc.terminate()
        proc.wait(20)
