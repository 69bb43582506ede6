"""A simulated student's browser tab: a websocket to a Streamlit server's `/_stcore/stream`
speaking the protocol the frontend speaks (protobuf BackMsg up, ForwardMsg down), so one process
carries hundreds of students (bench.simulate seats a class of them). What the tab is shown goes
to a `student` object: element(now, kind, el), run_started(), run_ended(now, status, fragment),
and counters (messages, received, cache_hits, error, exceptions).

The protocol (streamlit 1.67's server, web/server/starlette/starlette_websocket.py and
runtime/app_session.py; the frontend's connection/WebsocketConnection.tsx, App.tsx and
WidgetStateManager.ts):
- Before the websocket the frontend GETs /_stcore/health (which sets the _streamlit_xsrf
  cookie) and /_stcore/host-config; the websocket then offers subprotocols ["streamlit",
  <that cookie's value, or a placeholder>] and the server picks "streamlit". The XSRF
  token only gates the st.login cookie: a client without it connects and runs alike.
- A script run is asked for with BackMsg.rerun_script (a ClientState): the query string,
  the page (page_name "train" until the server names its page_script_hash), the widget
  states, the hashes of the messages the client has cached, the browser context (url,
  timezone, locale), and for a fragment, its fragment_id with is_auto_rerun.
- Widget ids come from the deltas ("$$ID-<hash>-<user key>"); a value is a WidgetState
  (the Seed number_input a double_value, a slider a double_array_value) sent with every
  later rerun, as the browser sends its widgets' values; a button press is a
  trigger_value of true sent once.
- The server answers with ForwardMsgs: new_session at each run's start (its metadata names
  the fragments of a fragment run; a full run clears every auto-rerun timer), navigation
  (st.navigation's pages and the page_script_hash of the page that ran: later reruns name
  it; new_session's own hash is the entrypoint's),
  deltas (new_element, add_block), page_info_changed (the new query string, sent with later
  reruns), auto_rerun (a fragment's run_every: the client reruns that fragment every
  interval; the same interval again keeps the timer), stop_auto_rerun, script_finished.
- A cacheable message (a new_element of 10 kB or more) is kept by hash; the next reruns
  list the hashes, and the server then sends a ref_hash in its place. Entries expire after
  max_cached_message_age finished runs, as the frontend's ForwardMsgCache does.
- Cookies: the app sets its owner cookie with an injected <script> (st.html); a websocket
  client does not run it. It only matters to a later connection of the same browser (a
  refresh, a new tab), which a simulated student never makes.
Not simulated: the page's static files (the JavaScript bundles a browser loads, some only
when the first chart appears: issue 35 item 3 measures them through the proxy), rendering.
"""
import asyncio
import contextlib
import time
from urllib.parse import urlsplit

from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState
from websockets.asyncio.client import connect

FULL_RUN, FRAGMENT_RUN = ForwardMsg.FINISHED_SUCCESSFULLY, ForwardMsg.FINISHED_FRAGMENT_RUN_SUCCESSFULLY


class ProtocolError(RuntimeError):
    pass


async def http_get(url, cookies, timeout=120):
    """GET `url` as a browser loads a page (HTTP/1.1, closed after): (status, {cookie: value})
    from its Set-Cookie headers. Through the proxy this is what gives the sticky cookie."""
    where = urlsplit(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(where.hostname, where.port), timeout)
    try:
        head = [f"GET {where.path or '/'}{'?' + where.query if where.query else ''} HTTP/1.1",
                f"Host: {where.netloc}", "User-Agent: peft-simulated-student", "Accept: text/html",
                "Connection: close"]
        if cookies:
            head.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in cookies.items()))
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)  # to EOF
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    got = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "set-cookie":
            k, _, v = value.strip().split(";", 1)[0].partition("=")
            got[k.strip()] = v.strip()
    return status, got


class Page:
    """One browser tab on one page of the app, speaking the frontend's side of Streamlit's
    websocket protocol (see the module's docstring); what it is shown goes to `student`."""

    def __init__(self, base_url, path, student):
        self.base, self.path, self.student = base_url.rstrip("/"), path, student
        self.cookies = {}
        self.page_hash, self.query = "", ""
        self.widgets = {}        # user key -> the widget's proto (button, slider...) as last drawn
        self.values = {}         # widget id -> WidgetState: what this tab sends with every rerun
        self.timers = {}         # fragment id -> (interval s, asyncio task)
        self.cache = {}          # message hash -> [encoded ForwardMsg, run count at last use, fragment id]
        self.cache_runs, self.max_age = 0, 2
        self.new_session_seen = False  # a new_session arrived since our last rerun request
        self.full_runs = 0       # full runs ended successfully since the page opened
        self.fragment_ids = []   # of the run going on
        self.ws, self._reader = None, None
        self._changed = asyncio.Event()
        self.closed_error = None

    # -------------------------------------------------------------- connecting
    async def open(self, timeout=300):
        """Load the page and ping the server as the frontend does before it connects (the
        cookies: the proxy's sticky one, Streamlit's _streamlit_xsrf from the health
        endpoint), connect the websocket and run the script once."""
        for path in (self.path, "_stcore/health", "_stcore/host-config"):  # the page, then the frontend's pings
            status, got = await http_get(f"{self.base}/{path}", self.cookies, timeout)
            if status != 200:
                raise ProtocolError(f"GET /{path}: HTTP {status}")
            self.cookies.update(got)
        ws_url = self.base.replace("http://", "ws://", 1) + "/_stcore/stream"
        headers = {"Origin": self.base, "User-Agent": "peft-simulated-student"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        token = self.cookies.get("_streamlit_xsrf") or "PLACEHOLDER_AUTH_TOKEN"
        # no client pings (a browser sends none; the server's pings are answered), no size cap
        self.ws = await connect(ws_url, subprotocols=["streamlit", token], additional_headers=headers,
                                max_size=None, ping_interval=None, open_timeout=timeout, close_timeout=2)
        self._reader = asyncio.create_task(self._read())
        runs = self.full_runs
        await self.rerun()
        await self.wait_until(lambda: self.full_runs > runs, timeout)

    async def close(self):
        for _, task in self.timers.values():
            task.cancel()
        self.timers.clear()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader

    async def wait_until(self, done, timeout):
        deadline = time.monotonic() + timeout
        while not done():
            if self.closed_error:
                raise ProtocolError(self.closed_error)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"waited {timeout:.0f} s")
            changed = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    def _notify(self):
        self._changed.set()
        self._changed = asyncio.Event()

    # -------------------------------------------------------------- sending
    def widget_id(self, key):
        el = self.widgets.get(key)
        if el is None:
            raise ProtocolError(f"no widget with key {key!r} on /{self.path}")
        return el.id

    def key_starting(self, prefix):
        keys = [k for k in self.widgets if k.startswith(prefix)]
        if not keys:
            raise ProtocolError(f"no widget with a key starting {prefix!r} on /{self.path}")
        return keys[0]

    async def rerun(self, fragment_id="", auto=False, trigger=None):
        """Send rerun_script as the frontend's sendRerunBackMsg does."""
        msg = BackMsg()
        cs = msg.rerun_script
        cs.query_string = self.query
        if self.page_hash:
            cs.page_script_hash = self.page_hash
        else:
            cs.page_name = self.path  # a deep link, before the server has named its page
        cs.fragment_id = fragment_id
        cs.is_auto_rerun = auto
        for state in self.values.values():
            cs.widget_states.widgets.append(state)
        if trigger:
            cs.widget_states.widgets.add(id=trigger, trigger_value=True)
        cs.cached_message_hashes.extend(self.cache)
        info = cs.context_info
        info.timezone, info.timezone_offset, info.locale = "UTC", 0, "en-US"
        info.url = f"{self.base}/{self.path}" + (f"?{self.query}" if self.query else "")
        info.color_scheme = "light"
        self.new_session_seen = False
        await self.ws.send(msg.SerializeToString())

    async def set_value(self, key, timeout=300, **value):
        """Set a widget's value as its browser widget would (e.g. double_value=3), and wait for
        the full run it starts."""
        wid = self.widget_id(key)
        self.values[wid] = WidgetState(id=wid, **value)
        runs = self.full_runs
        await self.rerun()
        await self.wait_until(lambda: self.full_runs > runs, timeout)

    async def press(self, key):
        """Click a button: its trigger value goes out once."""
        el = self.widgets.get(key)
        if el is None:
            raise ProtocolError(f"no button with key {key!r} on /{self.path}")
        if el.disabled:
            raise ProtocolError(f"the button {key!r} is disabled")
        await self.rerun(trigger=el.id)

    # -------------------------------------------------------------- receiving
    async def _read(self):
        try:
            async for data in self.ws:
                self._handle(data, time.time())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a dropped connection: recorded, the waiters wake up
            self.closed_error = f"websocket: {type(e).__name__}: {e}"
        else:
            self.closed_error = f"websocket closed by the server ({self.ws.close_code})"
        finally:
            for _, task in self.timers.values():
                task.cancel()
            self._notify()

    def _handle(self, data, now):
        s = self.student
        s.messages += 1
        s.received += len(data)
        msg = ForwardMsg.FromString(data)
        kind = msg.WhichOneof("type")
        if kind == "ref_hash":  # a message this tab has cached: the server sent only its hash
            entry = self.cache.get(msg.ref_hash)
            if entry is None:
                s.error = s.error or f"cache miss for {msg.ref_hash}"
                return
            entry[1] = self.cache_runs
            cached = ForwardMsg.FromString(entry[0])
            cached.metadata.CopyFrom(msg.metadata)
            msg, kind = cached, cached.WhichOneof("type")
            s.cache_hits += 1
        elif msg.metadata.cacheable and msg.hash:
            if msg.hash in self.cache:
                self.cache[msg.hash][1] = self.cache_runs
            else:
                self.cache[msg.hash] = [data, self.cache_runs, msg.delta.fragment_id if kind == "delta" else ""]

        if kind == "delta":
            delta = msg.delta
            if delta.WhichOneof("type") == "new_element":
                el_kind = delta.new_element.WhichOneof("type")
                el = getattr(delta.new_element, el_kind)
                widget_id = getattr(el, "id", "") if el_kind not in ("heading", "markdown") else ""
                if widget_id.startswith("$$ID-"):
                    key = widget_id.split("-", 2)[2]
                    if key != "None":
                        self.widgets[key] = el
                s.element(now, el_kind, el)
        elif kind == "navigation":  # st.navigation names the page that ran: later reruns ask for it
            self.page_hash = msg.navigation.page_script_hash or self.page_hash
        elif kind == "new_session":
            self.new_session_seen = True
            if not self.page_hash:  # an app without st.navigation: the page is the script's
                self.page_hash = msg.new_session.page_script_hash
            self.max_age = msg.new_session.config.max_cached_message_age or self.max_age
            self.fragment_ids = list(msg.metadata.run.fragment_ids)
            if not self.fragment_ids:  # a full run: every auto-rerun timer goes (App.handleNewSession)
                for _, task in self.timers.values():
                    task.cancel()
                self.timers.clear()
            s.run_started()
        elif kind == "auto_rerun":
            self._auto_rerun(msg.auto_rerun.fragment_id, msg.auto_rerun.interval)
        elif kind == "stop_auto_rerun":
            for fid in msg.stop_auto_rerun.fragment_ids:
                timer = self.timers.pop(fid, None)
                if timer:
                    timer[1].cancel()
        elif kind == "page_info_changed":
            self.query = msg.page_info_changed.query_string
            s.runs = self.query
        elif kind == "script_finished":
            status = msg.script_finished
            fragments = list(msg.metadata.run.fragment_ids)
            if status in (FULL_RUN, FRAGMENT_RUN) and self.new_session_seen:
                self._expire_cache(fragments)
            if status == FULL_RUN:
                self.full_runs += 1
            s.run_ended(now, status, bool(fragments) or status == FRAGMENT_RUN)
            self._notify()
        elif kind == "session_event" and msg.session_event.WhichOneof("type") == "script_compilation_exception":
            s.exceptions.append("script compilation: " + msg.session_event.script_compilation_exception.message[:200])

    def _expire_cache(self, fragment_ids):
        """The frontend's ForwardMsgCache.incrementRunCount."""
        self.cache_runs += 1
        for h, (_, used, fid) in list(self.cache.items()):
            if fragment_ids and fid not in fragment_ids:
                continue
            if self.cache_runs - used > self.max_age:
                del self.cache[h]

    def _auto_rerun(self, fragment_id, interval):
        """App.handleAutoRerun: the same interval again keeps the countdown."""
        if not fragment_id:
            return  # a page-level auto rerun: the app has none
        old = self.timers.get(fragment_id)
        if old and old[0] == interval:
            return
        if old:
            old[1].cancel()
        self.timers[fragment_id] = (interval, asyncio.create_task(self._tick(fragment_id, interval)))

    async def _tick(self, fragment_id, interval):
        """setInterval: a fragment rerun every `interval` s; a late tick does not burst."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += interval
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = max(due, loop.time() - interval / 2)
            try:
                await self.rerun(fragment_id=fragment_id, auto=True)
            except Exception:
                return  # the connection is gone: _read records why
