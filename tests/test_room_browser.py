"""A real room in a real browser (issue 30): students paste their address bar into the class
chat, a page on another port of the same host plants cookies, a teacher leaves a shared
computer. A bank belongs to the browser that made it; cookies carry no secret a classmate
could use; teacher mode expires and can be left."""
import http.server
import threading
import time
from functools import partial

import pytest

from harness.browser import wait_ready
from harness.servers import free_port
from peftcore import library
from test_browser import EXCEPTION, see, start_class, visit

PHI_FILE = (library.LIBRARY_DIR / "lora" / "times_3" / "adapter_model.safetensors").read_bytes()


def upload(page, url, name):
    """Save a phi into this browser's bank through the serve page's uploader."""
    visit(page, f"{url}/serve")
    page.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(
        files=[dict(name=f"{name}.safetensors", mimeType="application/octet-stream", buffer=PHI_FILE)])
    see(page, f"Loaded {name}")
    wait_ready(page)


def cookies(page):
    return {c["name"]: c for c in page.context.cookies()}


def private_link(page):
    page.get_by_test_id("stSidebar").get_by_text("Move my bank to another device").click()
    link = page.get_by_test_id("stPopoverBody").get_by_test_id("stCode").inner_text().strip()
    page.keyboard.press("Escape")
    return link


def test_a_pasted_address_bar_and_a_classmates_link_never_take_a_bank_over(new_page, url):
    ada, bo = new_page(), new_page()
    upload(ada, url, "adas-phi")
    upload(bo, url, "bos-phi")
    assert "bank=" not in ada.url and "bank=" not in bo.url  # nothing in the address bar to paste on

    visit(bo, ada.url)  # Ada pasted her address bar into the chat; Bo opens it
    see(bo, "bos-phi")
    assert bo.get_by_text("adas-phi").count() == 0

    bos_cookie = cookies(bo)["peft_bank"]["value"]
    visit(bo, private_link(ada))  # even Ada's private link, pasted by mistake, only offers her bank
    see(bo, "This link opens another bank")
    assert "bank=" not in bo.url
    visit(bo, f"{url}/serve")  # a new visit of Bo's browser: still his own bank
    see(bo, "bos-phi")
    assert bo.get_by_text("adas-phi").count() == 0 and cookies(bo)["peft_bank"]["value"] == bos_cookie
    assert bo.locator(EXCEPTION).count() == 0


@pytest.fixture
def other_port():
    """A page on another port of the same host (Jupyter, a file server, a classmate's app):
    it sets cookies for the host, which browsers do not scope by port."""
    page = (b"<script>document.cookie='peft_bank=AAAAAAAAAAAAAAAAAAAAAA; path=/';"
            b"document.cookie='peft_owner=" + b"B" * 44 + b"; path=/';</script>planted")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_cookies_planted_from_another_port_are_refused_and_replaced(page, url, other_port):
    page.goto(other_port)
    assert cookies(page)["peft_bank"]["value"] == "A" * 22  # the browser took them for the app's host
    visit(page, f"{url}/serve")
    see(page, "this server did not make")
    page.wait_for_function("!document.cookie.includes('peft_owner=BBBB')", timeout=30_000)
    jar = cookies(page)
    assert jar["peft_owner"]["value"] != "B" * 44
    page.wait_for_function("!document.cookie.includes('peft_bank=AAAA')", timeout=30_000)
    assert page.locator(EXCEPTION).count() == 0


def test_teacher_mode_keeps_no_key_expires_and_can_be_left(page, url):
    code = start_class(page, url, "Shared PC")
    key = page.get_by_test_id("stCode").first.inner_text().strip()
    page.get_by_role("button", name="I have copied the key").click()
    wait_ready(page)
    page.wait_for_function(f"document.cookie.includes('peft_teacher_{code}=')", timeout=30_000)
    cookie = cookies(page)[f"peft_teacher_{code}"]
    assert key not in cookie["value"]  # a script of the page reads a handle, never the key
    assert 0 < cookie["expires"] - time.time() <= 8 * 3600 + 60  # hours, not a year
    page.reload()
    wait_ready(page)
    see(page, "Close the class")  # a reload keeps teacher mode

    page.get_by_role("button", name="Leave teacher mode").click()
    wait_ready(page)
    page.wait_for_function(f"!document.cookie.includes('peft_teacher_{code}=')", timeout=30_000)
    page.reload()
    wait_ready(page)
    see(page, "I am the teacher of this class")  # the next user of this computer is a student
    assert page.get_by_role("button", name="Close the class").count() == 0
    assert page.locator(EXCEPTION).count() == 0


def test_link_values_render_as_text_never_as_a_link_or_an_image(page, url):
    """A crafted exercise link: its values are echoed in the page's warning, as text only."""
    visit(page, f"{url}/train?only=www.evil.example,[x](http://evil.example/a)"
                "&hide=![i](http://evil.example/i.png)&lock=http://evil.example/b")
    see(page, "This link had values that do not fit")
    assert page.locator("a[href*='evil']").count() == 0
    assert page.locator("img[src*='evil']").count() == 0
    assert page.locator(EXCEPTION).count() == 0
