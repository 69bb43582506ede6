"""The class save box and a visitor's text in a real browser (issue 30, items 7 and 10): a student
who trained and saved a phi finds it selected when they join a class (not a library phi), the
default click saves it and the header counts it at once; a file's name, a file's own config and
a class's name render as plain text: no link, no image fetched from another host."""
import json

from safetensors import safe_open
from safetensors.torch import save as st_save

from harness.browser import wait_ready
from peftcore import library
from test_browser import EXCEPTION, see, short_run, start_class, visit

PHI_FILE = library.LIBRARY_DIR / "lora" / "times_3" / "adapter_model.safetensors"
# a link, and an image the browser would fetch from another host (https:host reads as https://host/)
HOSTILE = "[x](http:evil.example) ![i](https:evil.example)"


def no_markup_from(page, host="evil.example"):
    """Nothing on the page links to or loads from `host` (the new_page fixture also fails a
    test whose pages asked another host for anything)."""
    assert page.locator(f'a[href*="{host}"]').count() == 0
    assert page.locator(f'img[src*="{host}"]').count() == 0


def selected(page, label):
    """What the selectbox labelled `label` shows as chosen (its combobox's text)."""
    return page.get_by_test_id("stSelectbox").filter(has_text=label).get_by_role("combobox").input_value()


def test_the_class_save_box_selects_the_phi_the_student_just_saved(new_page, url):
    code = start_class(new_page(), url, "Room 30")

    student = new_page()
    visit(student, f"{url}/train")
    short_run(student)
    name = student.get_by_role("textbox", name="Name in your bank").input_value()
    student.get_by_role("button", name="Save to my bank").click()
    see(student, f"Saved {name}")

    student.get_by_test_id("stSidebarNav").get_by_text("Class").click()  # the same tab: the same bank
    wait_ready(student)
    student.get_by_role("textbox", name="Join code").fill(code)
    student.get_by_role("button", name="Join").click()
    see(student, "0 phi in the class")
    wait_ready(student)
    chosen = selected(student, "phi from your bank")
    assert chosen == name, chosen  # their own phi, not the first library one
    student.get_by_role("textbox", name="Your name on the board").fill("Ada")
    student.keyboard.press("Enter")
    wait_ready(student)
    student.get_by_role("button", name="Save into the class").click()  # the default click
    wait_ready(student)
    see(student, f"Saved {name} into")
    see(student, "1 phi in the class")  # the header counts it in the same run, no reload
    assert student.locator(EXCEPTION).count() == 0


def hostile_config_file():
    """A phi file whose own config names a task that is markdown: its loader error quotes it."""
    with safe_open(str(PHI_FILE), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    config = json.loads(meta["adapter_config"])
    config["peftcore"]["task"] = "[y](http:evil.example)"
    return st_save(tensors, metadata={**meta, "adapter_config": json.dumps(config)})


def test_a_visitors_text_renders_as_plain_text(new_page, url):
    page = new_page()
    visit(page, f"{url}/serve")
    uploader = page.get_by_test_id("stFileUploaderDropzoneInput")
    uploader.set_input_files(files=[dict(name=f"{HOSTILE}.safetensors", mimeType="application/octet-stream",
                                         buffer=b"not a safetensors file")])
    see(page, "was not loaded")
    see(page, HOSTILE)  # the name, as typed, in plain text
    no_markup_from(page)
    uploader.set_input_files(files=[dict(name="config.safetensors", mimeType="application/octet-stream",
                                         buffer=hostile_config_file())])
    see(page, "[y](http:evil.example)")  # the file's own text, quoted in plain text
    no_markup_from(page)

    code = start_class(page, url, "www.evil.example")  # an autolink, were a class name read as markdown
    see(page, f"www.evil.example · join code {code}")
    no_markup_from(page)
    assert page.locator(EXCEPTION).count() == 0
