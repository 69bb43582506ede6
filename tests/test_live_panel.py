"""What a class costs the web server per student (issue 35): a result card proposes a name for
the Save box without loading this session's bank (the 25 library phi, 125 ms) for a student who
may never save; the name still avoids every name the bank will hold. A server holding many
pages refreshes each less often."""
import os
import traceback

import pytest

import peftcore
from apptest import app, wait_for
from peftcore import library
from peftcore.service.store import Store


def test_a_result_card_does_not_load_the_library_and_its_name_is_still_new(monkeypatch, base):
    loads, real = [], library.load_library
    monkeypatch.setattr(library, "load_library",
                        lambda *a, **k: loads.append("".join(traceback.format_stack(limit=12))) or real(*a, **k))
    store = Store(os.environ["PEFT_STORE"], base=base)
    token = store.mint_token("bank")
    model = peftcore.PeftModel.from_pretrained(base, dict(library.entries())["lora-times_3"])
    store.save_phi(token, "lora-times_3-2", peftcore.adapter_to_bytes(model, "default"))

    at = app()
    at.session_state["bank_token"] = token  # this browser's bank, which holds lora-times_3-2
    at.run()  # the storage page, which lists the bank; a student on /train never opened it:
    del at.session_state[f"bank:{peftcore.resolve_device('auto')}"]
    loads.clear()
    at.switch_page("app_pages/train.py").run()
    at.slider(key="steps-LoRA").set_value(10).run()
    at.button(key="train_go").click().run()
    wait_for(at, lambda at: any(s.value.startswith("Results on") for s in at.header))
    assert not loads, loads[0][-3000:]  # no page the student saw needed the bank
    name = next(t for t in at.text_input if t.label == "Name in your bank").value
    assert name == "lora-times_3-3"  # the library holds lora-times_3, the student's bank lora-times_3-2


@pytest.mark.parametrize("pages, live, waiting", [(1, 0.75, 2.0), (50, 0.75, 2.0), (80, 1.2, 2.4),
                                                  (100, 1.5, 3.0), (300, 1.5, 3.0)])
def test_a_server_holding_many_pages_refreshes_each_less_often(monkeypatch, pages, live, waiting):
    """300 pages on 3 servers refreshing every 0.75 s overloaded them until pages went minutes
    without an update (BENCHMARKS.md); the interval grows with the server's open pages, and
    stays within what a live update a second needs (>= 0.5 a second)."""
    import ui
    monkeypatch.setattr(ui.runs, "open_pages", lambda: pages)
    assert ui.poll_interval(waiting=False) == pytest.approx(live)
    assert ui.poll_interval(waiting=True) == pytest.approx(waiting)

