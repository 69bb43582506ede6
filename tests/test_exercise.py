"""Teacher links on the train page (AppTest): a link sets controls, locks or hides them,
a bad value is reported and reset, and the page builds such a link from its settings."""
from urllib.parse import parse_qsl, urlsplit

from apptest import open_page


def open_train(query):
    return open_page("app_pages/train.py", query)


def labels(widgets):
    return [w.label for w in widgets]


def test_a_link_sets_locks_and_hides_controls():
    at = open_train({"task": "complement", "method": "Adapter", "bottleneck_size": "4", "lr": "0.005",
                     "only": "bottleneck_size,steps", "hide": "lr"})
    assert at.selectbox(key="task").value == "complement" and at.selectbox(key="task").disabled
    assert at.selectbox(key="method").value == "Adapter" and at.selectbox(key="method").disabled
    b = at.slider(key="adapter.bottleneck_size")
    assert b.value == 4 and not b.disabled
    assert "Learning rate" not in labels(at.select_slider)  # hidden...
    assert not any("0.005" in c.value for c in at.caption)  # hidden: not even in the set-up line
    assert any("you may change `bottleneck_size`, `steps`" in i.value for i in at.info)
    b.set_value(8).run()  # what the exercise leaves free still changes
    assert at.slider(key="adapter.bottleneck_size").value == 8 and not at.exception


def test_bad_values_in_a_link_are_reported_and_reset():
    at = open_train({"r": "abc", "steps": "5", "task": "nope", "target_modules": "q,zz", "only": "r,bogus"})
    warning = " ".join(w.value for w in at.warning)
    for name in ("r=`'abc'`", "steps=`'5'`", "task=`'nope'`", "target_modules=`'q,zz'`", "bogus"):
        assert name in warning, (name, warning)
    assert at.slider(key="lora.r").value == 1 and at.selectbox(key="task").value == "times_3"  # the defaults


def test_the_page_builds_a_link_that_reopens_the_same_exercise():
    at = open_train({})
    at.slider(key="lora.r").set_value(3).run()
    at.pills(key="link_only").set_value(["r"]).run()
    at.pills(key="link_hide").set_value(["steps"]).run()
    link = [c.value for c in at.code if "/train?" in c.value][0]
    query = dict(parse_qsl(urlsplit(link).query))
    assert query["r"] == "3" and query["only"] == "r" and query["hide"] == "steps"
    again = open_train(query)
    assert again.slider(key="lora.r").value == 3 and not again.slider(key="lora.r").disabled
    assert again.slider(key="lora.lora_alpha").disabled and "Steps" not in labels(again.slider)


def test_a_reopened_race_link_shows_the_race_setup():
    at = open_train({})
    at.radio(key="mode").set_value("Race").run()
    at.pills(key="race_methods").set_value(["LoRA", "Adapter"]).run()
    at.slider(key="race_steps").set_value(10).run()
    at.button(key="train_go").click().run()
    ids = at.session_state["groups"]["train"]
    reopened = open_train({"train": ",".join(ids)})  # another session opens the link
    assert reopened.radio(key="mode").value == "Race"
    assert reopened.pills(key="race_methods").value == ["LoRA", "Adapter"]
    assert reopened.slider(key="race_steps").value == 10


def test_the_adapter_placement_is_a_control_and_a_link():
    preset, both = "phi = 16,960 trainable parameters, 2.12%", "phi = 33,920 trainable parameters, 4.25%"
    at = open_train({"method": "Adapter"})
    assert at.pills(key="adapter.target_sublayers").value == ["mlp"]  # the preset: after the MLP only
    assert any(preset in c.value for c in at.caption)
    at.pills(key="adapter.target_sublayers").set_value(["attn", "mlp"]).run()  # Houlsby's two per block
    assert any(both in c.value for c in at.caption) and not at.exception
    at.pills(key="adapter.target_sublayers").set_value([]).run()  # none: said, and nothing can start
    assert any("target_sublayers must name one or both" in e.value for e in at.error)
    assert at.button(key="train_go").disabled
    linked = open_train({"method": "Adapter", "adapter_target_sublayers": "attn,mlp"})
    assert any(both in c.value for c in linked.caption)
    bad = open_train({"method": "Adapter", "adapter_target_sublayers": "ffn"})
    assert "adapter_target_sublayers=`'ffn'`" in " ".join(w.value for w in bad.warning)
    assert bad.pills(key="adapter.target_sublayers").value == ["mlp"]
