"""Words that say what is true and where things are (issue 32, items 6 to 8): a refused link value
or join code says what would have been taken, the start of training is read against a uniform
guess by its sign, and the prefix lesson does not say prefix tuning must fail where it solves."""
import math

from apptest import app, open_page

import ui
import views


def texts(at):
    return [t.value for kind in ("toast", "error", "caption", "markdown") for t in getattr(at, kind)]


def storage(p):
    at = app()  # the storage page is the default: its first run reads the link
    at.query_params["p"] = p
    return at.run()


def test_a_bare_percent_in_a_link_says_the_percent_sign_is_missing():
    toast = next(t for t in texts(storage("0.3")) if "p=" in t)
    assert "with a % sign: p=0.3%25" in toast, toast


def test_a_refused_slider_value_lists_the_steps_the_slider_takes():
    toast = next(t for t in texts(storage("0.4%")) if "p=" in t)
    assert "0.3%, 0.5%" in toast and "reset to 1%" in toast  # the steps around 0.4% are listed


def test_a_join_code_with_a_1_says_which_letters_and_digits_a_code_uses():
    at = open_page("app_pages/classroom.py")
    at.text_input(key="join_code").input("ABC123")
    at.button(key="join_class").click().run()
    error = next(t for t in texts(at) if t.startswith("Cannot join"))
    assert ui.CODE_ALPHABET in error and "no 0, 1, I, L or O" in error, error


def test_the_start_of_training_is_read_against_a_uniform_guess_by_its_sign():
    uniform = math.log(10)
    above = ui.start_sentence({"times_3": uniform + 1.36, "sort": uniform - 0.2})
    assert "On times_3 it starts above that: confidently wrong" in above and "sort" not in above.split("ln 10")[1]
    assert "unsure, not confidently wrong" in ui.start_sentence({"times_3": uniform - 0.1})


def test_the_prefix_lesson_says_a_prefix_can_make_a_new_digit_map():
    lesson = views.view_of("PREFIX_TUNING").lesson
    assert "must build a new digit map" not in lesson
    assert "a prefix adds a learned term to every layer" in lesson


def test_the_storage_link_keeps_every_setting_the_page_says_it_keeps():
    at = app()
    at.query_params.update({"unit": "bytes", "gpu_gb": "24 GB", "base_size": "LLaMA-2 7B"})
    at.run()
    assert (at.radio(key="unit").value, at.select_slider(key="gpu_gb").value,
            at.selectbox(key="base_size").value) == ("bytes", 24, "LLaMA-2 7B")
    assert any("keeps every setting on this page" in m.value for m in at.markdown)
    at = app()
    at.query_params["gpu_gb"] = "3 GB"  # refused, and said so
    toast = next(t for t in texts(at.run()) if "gpu_gb=" in t)
    assert "8 GB, 16 GB" in toast and "reset to 80 GB" in toast


def test_the_byte_table_says_the_train_preset_differs_from_the_row_it_prices():
    from peftcore.presets import PRESETS
    lora = PRESETS["LORA"].config
    note = [c.value for c in app().run().caption if c.value.startswith("LoRA r=4 on q, v")]
    assert len(note) == 1 and f"preset differs: r={lora.r} on {', '.join(lora.target_modules)}" in note[0]


def test_the_seed_notes_bar_and_the_live_runs_bar_are_each_named():
    from peftcore.presets import SOLVES_AT
    from peftcore.train import SOLVED
    at = open_page("app_pages/train.py")
    note = next(c.value for c in at.caption if "seeds**" in c.value)
    assert f"reaches {100 * SOLVES_AT:.0f}% held-out exact match" in note
    assert f"the recorded table's bar; a live run stops at {100 * SOLVED:.0f}%, twice in a row" in note
    assert "solve" not in note  # the word is the live run's (tests/test_visitor.py)
