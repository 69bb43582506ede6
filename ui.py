"""What the pages share: the cached base and run manager, this session's bank and runs,
and chart helpers. UI glue only; the torch work lives in peftcore.

One base per device and one RunManager per server process (st.cache_resource), shared by
every session. A session's bank of phi and the ids of its runs live in st.session_state;
the runs themselves live in the manager, so a rerun or a page switch never loses one.
"""
import contextlib
import functools
import json
import logging
import os
import re
import secrets
import threading
import weakref
from urllib.parse import urlencode, urlsplit, urlunsplit

import plotly.graph_objects as go
import streamlit as st
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

import peftcore
import views
from peftcore import analysis, library
from peftcore.pretrain import evaluate as evaluate_pretraining, first_loss
from peftcore.service import store as store_mod
from peftcore.service.executors import RunSpec
from peftcore.service.runs import QUEUED, QueueFull, RunManager
from peftcore.service.store import StoreError, normalize_code  # noqa: F401 - the pages catch and use these through ui
from peftcore.service.warmup import start_warm_up
from peftcore.storage import human_bytes
from peftcore.tasks import EVAL_SIZE
from peftcore.train import solved_at

log = logging.getLogger("peft_playground")
MAX_SESSION_RUNS = max(4, len(peftcore.METHODS))  # runs one visitor may have training or waiting, across
                                                  # tabs: a race of every method at once
POLL_S = 0.75          # live curves refresh at least once a second (a rerun costs the GIL: not faster)...
MAX_POLL_S = 1.5       # ...or, on a server holding many pages, every 1.5 s at most (>= 0.5 updates/s)
POLL_S_PER_PAGE = 0.015  # a live-panel run costs a server 3-5 ms of CPU (BENCHMARKS.md): 100 open pages
                         # at 1.5 s take about a third of a core
WAITING_POLL_S = 2.0   # a session whose runs all wait in line: only its place changes (a class of 30
                       # polling at POLL_S cost the server ~0.6 of a core in refreshes)

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
PEFT_COLOR = "#1f77b4"  # the bold PEFT curve of the storage charts: the idea, not one method
view_of = views.view_of  # how a method looks, by peft_type (views/: one file per method)


def method_views(shares_base=None):
    """The views of every registered method (or of those that do / do not share the base)."""
    return [v for v in views.all_views() if shares_base is None or v.method.shares_base == shares_base]


def view_named(name):
    return next(v for v in views.all_views() if v.name == name)


def run_view(run):
    """The view of the method a run trains (its model's active config)."""
    model = run.model
    return view_of(model.peft_config[model.active_adapter].peft_type)
ss = st.session_state


# ------------------------------------------------------------------ a section of a page
PANEL_FAILED = "could not be shown"  # what a visitor reads when a section of a page fails


@contextlib.contextmanager
def panel(what):
    """One section of a page (`what` names it for the visitor). If it fails, the visitor reads
    a short message, the details go to the server's log, and the rest of the page still draws.
    Streamlit's rerun and stop are BaseExceptions: they pass through."""
    try:
        yield
    except StoreError as e:  # the store's own messages are written for visitors
        st.error(f"{what}: {e}")
    except Exception:  # noqa: BLE001 - a visitor sees no traceback; the log has it
        log.exception("a page section failed: %s", what)
        st.error(f"{what} {PANEL_FAILED}: something went wrong on the server (its log has the "
                 "details). The rest of the page works; try again, or reset your session in the sidebar.")


# ------------------------------------------------------------------ process-wide resources
@st.cache_resource(show_spinner="Loading the frozen base...")
def get_base(device):
    """The frozen pretrained base, once per device for the whole server."""
    return peftcore.load_base(device=device)


@st.cache_resource(show_spinner="Building a random frozen base...")
def get_random_base(device):
    """The control: a randomly initialised frozen base of the same shape."""
    return peftcore.random_base(device=device)


@st.cache_resource
def get_manager():
    """One run service per server process: runs outlive the pages that started them; one
    training slot per core, a fair queue behind them. In this process (the default), or on
    Ray with PEFT_EXECUTOR=ray (README: a lecture hall)."""
    return make_manager(os.environ.get("PEFT_EXECUTOR", "inprocess"))


PER_ADDRESS_ENV = "PEFT_MAX_PER_ADDRESS"
PER_ADDRESS_DEFAULT = 8


def per_address_cap():
    """Runs one address may have training or waiting: $PEFT_MAX_PER_ADDRESS, 0 for no cap. A
    room behind one NAT (or a proxy that sends no X-Forwarded-For) is one address: raise it there."""
    text = os.environ.get(PER_ADDRESS_ENV, "").strip()
    if not text:
        return PER_ADDRESS_DEFAULT
    if not text.isdigit():
        log.error("%s=%r is not a whole number >= 0: the cap stays %d.", PER_ADDRESS_ENV, text, PER_ADDRESS_DEFAULT)
        return PER_ADDRESS_DEFAULT
    return int(text) or None  # None: RunManager's "no cap"


def make_manager(executor="inprocess"):
    """The run service: on Ray (workers elsewhere; the queue shared by every web server of
    the cluster, RAY_ADDRESS) or in this process. Ray not there: logged, and in-process."""
    if executor == "ray":
        from peftcore.service.ray_executor import RayUnavailable, ray_manager
        try:
            return ray_manager(base_of=lambda which, dev: BASES[which](dev),
                               num_cpus=int(os.environ["PEFT_RAY_CPUS"]) if os.environ.get("PEFT_RAY_CPUS") else None,
                               name=os.environ.get("PEFT_RAY_SERVICE") or "run-service", max_per_owner=MAX_SESSION_RUNS,
                               max_per_client=per_address_cap())
        except RayUnavailable as e:
            log.error("PEFT_EXECUTOR=ray, but %s: training runs in this web process instead.", e)
    elif executor != "inprocess":
        log.error("PEFT_EXECUTOR=%r is not an executor (inprocess, ray): training runs in this process.", executor)
    manager = RunManager(max_per_owner=MAX_SESSION_RUNS, max_per_client=per_address_cap())  # across tabs; per address
    # the first training of a process pays ~3 s of one-time setup: at server start, in the
    # background, not on the first student's click
    start_warm_up(get_base(device()), device())  # stopped and joined at exit: no abort mid torch op
    return manager


# The bases a run may train on, by name: a run's identity includes which (the random-base
# control must never be joined to the pretrained run with the same config).
BASES = {"pretrained": get_base, "random": get_random_base}


@st.cache_resource(show_spinner=False)
def attention_spread(which, task, device):
    """peftcore.analysis.attention_spread of a shipped base on a task, once per server."""
    return analysis.attention_spread(BASES[which](device), task)


@st.cache_resource
def base_fingerprint(which, device):
    return peftcore.fingerprint(BASES[which](device))


@st.cache_resource
def base_skills():
    """The shipped base measured once per process, on CPU: held-out exact match on every
    pretraining task, and the loss per answer digit on every downstream task before training."""
    base = get_base("cpu")
    return evaluate_pretraining(base), first_loss(base)


@st.cache_resource
def base_facts(device):
    """Numbers about the base the pages quote: its parameters, file bytes and config."""
    base = get_base(device)
    return dict(params=sum(p.numel() for p in base.parameters()), file_bytes=peftcore.base_file_bytes(),
                config=base.config, fingerprint=peftcore.fingerprint(base))


def available_devices():
    return sorted({"cpu", peftcore.resolve_device("auto")})


def device():
    return ss.get("device") or peftcore.resolve_device("auto")


def seed():
    return int(ss.get("seed", 0))


# ------------------------------------------------------------------ the store: saved phi outlive the tab
def store_path():
    """$PEFT_STORE, else `peft_store` in .streamlit/secrets.toml, else the user's data dir."""
    if os.environ.get(store_mod.ENV_VAR):
        return str(store_mod.default_path())
    try:
        configured = st.secrets.get("peft_store")
    except Exception:  # noqa: BLE001 - no secrets.toml (or a broken one): the default
        configured = None
    return str(configured or store_mod.default_path())


@st.cache_resource(show_spinner=False)
def get_store(path):
    """One Store per file for the server; files are vetted against the CPU copy of the base."""
    return store_mod.Store(path, base=get_base("cpu"))


def store():
    return get_store(store_path())


def client():
    """The visitor's address, for the store's per-address caps (None on localhost)."""
    return st.context.ip_address


def run_address():
    """The visitor's address for the per-address run cap. Loopback visitors share one name:
    behind a proxy on the same host that sends no X-Forwarded-For, the whole room is one
    address, capped like a room behind one NAT (PEFT_MAX_PER_ADDRESS sets the cap, 0 none)."""
    address = st.context.ip_address
    return address if isinstance(address, str) and address else "loopback"


# ------------------------------------------------------------------ who is who: tokens the server minted
# Nothing a classmate could copy carries a secret that takes a bank over: a bank token lives in
# this browser (session and cookie), never in the address bar; a ?bank= link is a private link
# that *offers* a bank, never replaces one. Every token is minted and signed by the server (the
# store keeps the key), so a made-up or forged value is refused.
BANK_COOKIE = "peft_bank"
OWNER_COOKIE = "peft_owner"
COOKIE_YEAR_S = 365 * 24 * 3600


def _token_ok(token, kind):
    """True or False; None when the store cannot tell now (busy, damaged): then the token is
    not used, and not thrown away either."""
    try:
        return bool(token) and store().token_ok(token, kind)
    except StoreError:
        return None


def _mint(kind):
    try:
        return store().mint_token(kind)
    except StoreError:  # no store: a token good for this session only
        return secrets.token_urlsafe(32)


def _cookie_token(name, kind):
    """A cookie's token if this server signed it; a value planted by anyone else is refused
    (said once) and overwritten."""
    value = st.context.cookies.get(name)
    if not isinstance(value, str) or not value:
        return None
    ok = _token_ok(value, kind)
    if ok is False:
        ss.setdefault("refused_cookies", []).append(name)
    return value if ok else None


def bank_token(create=False):
    """This browser's bank token: from the session, else this browser's cookie (a refresh or
    a new tab), else None; minted by the server when the student first saves (`create`)."""
    if "bank_token" not in ss:
        ss["bank_token"] = _cookie_token(BANK_COOKIE, "bank")
    if ss["bank_token"] is None and create:
        ss["bank_token"] = _mint("bank")
        set_cookie(BANK_COOKIE, ss["bank_token"])  # now: the visitor may leave before the next run
    return ss["bank_token"]


def use_bank(token):
    """Make `token` this browser's bank (a deliberate choice: see bank_offer)."""
    ss["bank_token"] = token
    ss.pop(f"bank:{device()}", None)  # load its saved phi afresh
    ss.pop("offered_bank", None)


def read_bank_link():
    """A ?bank= link is a student's private link to move their bank to another device. It
    leaves the address bar at once (so it is not pasted on), and offers that bank: it never
    silently replaces this browser's own."""
    token = st.query_params.get("bank")
    if token is None:
        return
    del st.query_params["bank"]
    if token == bank_token():
        return
    if not _token_ok(token, "bank"):  # a fault of the store included: the link is not taken blind
        st.toast("The bank link you opened is not one this server made: it was ignored. "
                 "Your own bank is unchanged.", icon="⚠️")
        return
    ss["offered_bank"] = token


def private_bank_link():
    """The link that moves this browser's bank to another device (None without a bank)."""
    token = bank_token()
    if not token:
        return None
    here = urlsplit(st.context.url or "http://localhost:8501/")
    return urlunsplit((here.scheme, here.netloc, "/", urlencode({"bank": token}), ""))


def bank_offer():
    """What a ?bank= link offers, shown above the page until the visitor chooses."""
    token = ss.get("offered_bank")
    if not token:
        return
    try:
        theirs = len(store().list_phi(owner=token))
    except StoreError as e:
        st.error(f"The bank in this link cannot be read now: {e}.")
        return
    mine = bank_token()
    with st.container(border=True):
        st.warning(f"**This link opens another bank** ({theirs} saved phi). "
                   + ("Your own bank stays as it is" if mine else "This browser has no bank of its own yet")
                   + ": nothing changes unless you choose. Use that bank only if it is yours, from another "
                   "device: whoever has the link can use and delete its phi.", icon=":material/key:")
        a, b = st.columns(2)
        a.button("Use that bank in this browser", key="take_offered_bank", on_click=use_bank, args=(token,),
                 width="stretch")
        b.button("Keep my own bank", key="keep_my_bank", on_click=ss.pop, args=("offered_bank", None),
                 width="stretch", type="primary")


def follow_visitor():
    """Called on every script run by app.py: the class stays in the link across page
    switches, refreshes and a reset; a ?bank= link is read (never followed); this browser's
    cookies are set (bank, owner, teacher) or cleared, and planted cookies reported."""
    read_bank_link()
    token = bank_token()
    if token:
        set_cookie(BANK_COOKIE, token)
    for code, handle in ss.get("teacher_handles", {}).items():
        if handle:
            set_cookie(teacher_cookie(code), handle, max_age=store_mod.TEACHER_TTL_S)
        else:
            clear_cookie(teacher_cookie(code))
    refused = ss.pop("refused_cookies", [])
    for name in refused:
        if not ss.get("cookies_sent", {}).get(name):  # not replaced by a token of ours: gone
            clear_cookie(name)
    if refused:
        st.toast("This browser held a cookie for this app that this server did not make (another site "
                 "on this machine may have set it): it was ignored and replaced.", icon="⚠️")
    code = st.query_params.get("class")
    if code:
        ss["class_code"] = code  # checked by the Class page
    elif ss.get("class_code"):
        st.query_params["class"] = ss["class_code"]


def forget_class():
    ss.pop("class_code", None)
    if "class" in st.query_params:
        del st.query_params["class"]


# ------------------------------------------------------------------ teacher mode
# The teacher key is shown once and never stored: a browser in teacher mode holds a handle
# the store signed, which names the class, expires, stops working when the class closes, and
# is forgotten by "Leave teacher mode".
def teacher_cookie(code):
    return f"peft_teacher_{code}"


def teacher_handle(code):
    """This browser's teacher handle for class `code`, or None."""
    handles = ss.setdefault("teacher_handles", {})
    if code not in handles:
        cookie = st.context.cookies.get(teacher_cookie(code))
        handles[code] = cookie if isinstance(cookie, str) and _teacher_of(cookie) == code else None
    elif handles[code] and _teacher_of(handles[code]) != code:  # expired, or the class closed
        handles[code] = None
    return handles[code]


def _teacher_of(handle):
    try:
        return store().teacher_of(handle)
    except StoreError:
        return None


def become_teacher(code, key):
    """Teacher mode for class `code` in this browser; raises StoreError for a wrong key."""
    ss.setdefault("teacher_handles", {})[code] = store().teacher_handle(code, key)


def leave_teacher(code):
    ss.setdefault("teacher_handles", {})[code] = None  # follow_visitor clears the cookie


# ------------------------------------------------------------------ this session's bank
def bank():
    """This session's PeftModel bank over the shared base: the shipped library, then the
    phi this student saved (from the store). A file that fails to load is skipped and
    reported, never fatal."""
    key = f"bank:{device()}"
    if key not in ss:
        model, errors = library.load_library(get_base(device()))
        errors = [f"library phi {e}" for e in errors]
        stored, token = {}, bank_token()
        try:
            saved = store().list_phi(owner=token) if token else []
        except StoreError as e:  # the pages work on without the store
            saved = []
            errors.append(f"your saved phi could not be read now ({e}); the library is here")
        for rec in saved:
            name = rec.name if rec.name not in model.peft_config else f"saved-{rec.id}"
            try:
                peftcore.load_adapter(model, name, store().load_bytes(rec.id))
                stored[name] = rec.id
            except (StoreError, peftcore.AdapterLoadError) as e:
                errors.append(f"saved phi {rec.name}: {e}")
        ss[key], ss["library_errors"], ss["file_bytes"], ss["stored_ids"] = model, errors, {}, stored
    return ss[key]


def add_to_bank(name, data):
    """Load phi file bytes into the bank and save them in the store, or neither: raises
    AdapterLoadError with the reason."""
    peftcore.load_adapter(bank(), name, data)
    try:
        rec = store().save_phi(bank_token(create=True), name, data, client=client())
    except StoreError as e:
        bank().delete_adapter(name)
        raise peftcore.AdapterLoadError(str(e)) from None
    ss["stored_ids"][name] = rec.id
    ss["file_bytes"].pop(name, None)


def remove_from_bank(name):
    """Take phi `name` out of the bank and, if the visitor saved it, delete it from the store.
    Raises StoreError (the phi stays) when the store cannot delete it now (busy, read-only)."""
    phi_id = ss["stored_ids"].get(name)
    if phi_id is not None:
        try:
            store().delete_phi(phi_id, owner=bank_token())
        except StoreError as e:
            if e.reason is not None:  # a fault of the store: nothing was deleted, say so
                raise
            # otherwise it is already gone (deleted by the teacher or in another tab)
    bank().delete_adapter(name)
    ss["file_bytes"].pop(name, None)
    ss["stored_ids"].pop(name, None)


def delete_my_phi():
    """Delete every phi this student saved (store and bank); returns how many."""
    n = store().delete_owner(bank_token())
    for name in list(ss.get("stored_ids", {})):
        remove_from_bank(name)
    return n


def file_bytes(name):
    """Measured size of phi `name` as a downloadable .safetensors file (cached)."""
    model, cache = bank(), ss["file_bytes"]
    if name not in cache:
        cache[name] = len(peftcore.adapter_to_bytes(model, name))
    return cache[name]


def bank_rows():
    """One dict per phi in the bank: method, task, parameters, phi %, file and formula bytes.
    Cached until the bank's content changes (phi in a bank never train)."""
    model, facts = bank(), base_facts(device())
    key = model.generation  # bumped on every add, delete, load or merge
    cached = ss.get("bank_rows")
    if cached and cached[0] == key:
        return cached[1]
    memory = model.memory_bytes()["phi"]
    rows = []
    for name, cfg in model.peft_config.items():
        n, formula = model.adapter_num_params(name), cfg.num_params(facts["config"])
        rows.append(dict(name=name, method=view_of(cfg.peft_type).name, peft_type=cfg.peft_type,
                         task=model.adapter_task.get(name) or "?", params=n, phi_pct=100 * n / facts["params"],
                         formula_params=formula, formula_bytes=formula * memory[name] // max(n, 1),
                         memory_bytes=memory[name], file_bytes=file_bytes(name)))
    ss["bank_rows"] = (key, rows)
    return rows


@st.cache_resource
def library_names():
    return frozenset(name for name, _ in library.entries())


def bank_names():
    """The names this session's bank holds, or will hold once loaded: a result card proposes a
    name without loading the 25 library phi (125 ms per session, issue 35) for a student who
    may never save."""
    if f"bank:{device()}" in ss:
        return set(bank().peft_config)
    names, token = set(library_names()), bank_token()
    if token:
        try:
            names |= {rec.name for rec in store().list_phi(owner=token)}
        except StoreError:
            pass  # the bank says so when it loads; a name proposed here is checked again on save
    return names


def unique_name(stem):
    """`stem`, or `stem-2`, `stem-3`... whichever the bank does not hold yet."""
    names, i, name = bank_names(), 2, stem
    while name in names:
        name, i = f"{stem}-{i}", i + 1
    return name


# ------------------------------------------------------------------ this visitor's runs across tabs
# A visitor is an owner token kept in a cookie, so a refresh or a new tab of the same
# browser finds its runs again, while a shared link (another browser) shows them read-only.
@st.cache_resource
def sessions_of_owner():
    """owner token -> ids of the sessions (tabs) it has had on this server."""
    return {}


def owner():
    """This visitor's token: from the cookie, or new (and set as the cookie)."""
    if "owner" not in ss:
        ss["owner"] = _cookie_token(OWNER_COOKIE, "owner") or _mint("owner")
    return ss["owner"]


def identify():
    """Called once per script run by app.py: remember this tab and keep the cookie set."""
    me = owner()
    ctx = get_script_run_ctx()
    if ctx is not None:
        sessions_of_owner().setdefault(me, set()).add(ctx.session_id)
    set_cookie(OWNER_COOKIE, me)


def set_cookie(name, value, max_age=COOKIE_YEAR_S):
    """Set a cookie in this browser (for a year unless `max_age` says otherwise), by a script
    sent once per session and value. Only tokens travel this way (letters, digits, '_' and
    '-'): nothing to escape."""
    assert re.fullmatch(r"[A-Za-z0-9_-]+", name + value)
    sent = ss.setdefault("cookies_sent", {})
    if st.context.cookies.get(name) == value or sent.get(name) == value:
        return
    sent[name] = value
    st.html(f"<script>document.cookie = '{name}={value}; path=/; max-age={int(max_age)}; SameSite=Strict'</script>",
            unsafe_allow_javascript=True)


def clear_cookie(name):
    """Delete a cookie from this browser, once per session."""
    sent = ss.setdefault("cookies_sent", {})
    if name not in st.context.cookies and name not in sent or sent.get(name, "") is None:
        return
    sent[name] = None
    st.html(f"<script>document.cookie = '{name}=; path=/; max-age=0; SameSite=Strict'</script>",
            unsafe_allow_javascript=True)


def connected(token):
    """Whether any tab of this owner is still open (outside a server, as in AppTest: yes)."""
    if not Runtime.exists():
        return True
    sessions = sessions_of_owner().get(token, set())
    alive = {s for s in sessions if Runtime.instance().is_active_session(s)}
    sessions.intersection_update(alive)
    return bool(alive)


# ------------------------------------------------------------------ runs
def group_runs(group):
    """The runs of `group` (e.g. "train") this page shows, oldest first. Run ids are also
    kept in the URL, so a refreshed page (or a shared link) finds them again."""
    groups = ss.setdefault("groups", {})
    if group not in groups and st.query_params.get(group):
        groups[group] = st.query_params[group].split(",")[:MAX_SESSION_RUNS]
    runs = get_manager().runs
    return [runs[i] for i in groups.get(group, []) if i in runs]


def owns(run):
    return owner() in run.owners


def active_session_runs():
    return [r for g in ss.get("groups", {}) for r in group_runs(g) if not r.finished and owns(r)]


def run_key(which, config, task, kwargs):
    """What makes two runs the same computation: the base they train on (its fingerprint),
    method config, task and every training argument (seed, steps, lr, batch...). Equal
    keys train bit-identical phi."""
    return (base_fingerprint(which, kwargs["device"]), json.dumps(config.to_dict(), sort_keys=True), task,
            json.dumps(kwargs, sort_keys=True))


def start_group(group, jobs, task, url=False, **train_kwargs):
    """Start (or join) one run per job (label, config, extra train kwargs) as group `group`,
    replacing the group's previous runs. A job trains on the pretrained base unless its
    extra kwargs say `base="random"`. Returns an error message instead when over a limit."""
    manager, ids = get_manager(), []
    for label, config, extra in jobs:
        kwargs = {**train_kwargs, **extra}
        which = kwargs.pop("base", "pretrained")
        kwargs.setdefault("eval_every", eval_every(kwargs.get("steps", 300)))
        base = BASES[which](kwargs["device"])
        make = functools.partial(peftcore.get_peft_model, base, config, seed=kwargs.get("seed", 0))
        spec = RunSpec(config.to_dict(), kwargs.get("seed", 0), which, base_fingerprint(which, kwargs["device"]))
        try:
            run = manager.start(make, task, label=label, owner=owner(), client=run_address(),
                                key=run_key(which, config, task, kwargs), spec=spec, **kwargs)
        except QueueFull as e:
            for i in ids:  # all of the group or none of it
                manager.stop(manager.runs[i], owner())
            return str(e)
        ids.append(run.id)
    ss.setdefault("groups", {})[group] = ids
    if url:
        st.query_params[group] = ",".join(ids)
    return None


def eval_every(steps):
    """About ten points on the accuracy curve of a short run, one per 25 steps on long ones."""
    return max(5, min(25, steps // 10))


def stop_group(group):
    """Stop this visitor's runs of `group`. A run shared with others carries on for them:
    this visitor leaves it (and it leaves the page)."""
    left = []
    for run in group_runs(group):
        if owns(run) and not get_manager().stop(run, owner()) and not run.finished:
            left.append(run.id)
    if left:
        ids = [i for i in ss["groups"][group] if i not in left]
        ss["groups"][group] = ids
        st.query_params[group] = ",".join(ids)
        ss["left_shared"] = len(left)


def stop_session_runs():
    for run in active_session_runs():
        get_manager().stop(run, owner())


@st.cache_resource
def _run_results():
    return weakref.WeakKeyDictionary(), threading.Lock()  # a run's entry goes when the manager drops it


def run_cache(run, what, compute):
    """Per-run results computed once for every session that shows the run (a class on the
    defaults shares one run: its file, fingerprint and sample outputs are computed once,
    the other sessions wait for them rather than compute them again)."""
    results, lock = _run_results()
    with lock:
        cache, run_lock = results.setdefault(run, ({}, threading.RLock()))  # re-entrant: a compute may ask another
    with run_lock:
        if what not in cache:
            cache[what] = compute()
    return cache[what]


def run_summary(run):
    """The numbers of a finished (or running) run's result card."""
    facts = base_facts(device())
    trainable = run_cache(run, "trainable", lambda: run.model.get_nb_trainable_parameters()[0])
    last, solved = run.last, solved_at(run.events)
    return dict(method=run.label, status=run.status, step=last.step if last else 0,
                steps=run.steps, trainable=trainable, phi_pct=100 * trainable / facts["params"],
                exact=last_eval(run, "eval_exact"), token=last_eval(run, "eval_token"),
                seconds=last.elapsed if last else 0.0,
                steps_per_s=last.step / last.elapsed if last and last.elapsed > 0 else 0.0,
                solved_step=solved.step if solved else None, solved_s=solved.elapsed if solved else None)


def last_eval(run, field):
    for event in reversed(run.events):
        value = getattr(event, field)
        if value is not None:
            return value
    return None


def live_runs(group):
    """Progress lines, a Stop button and overlaid loss / accuracy curves of a group's runs,
    polled every POLL_S seconds while any run is active; a full rerun once all end."""
    runs = group_runs(group)
    if ss.pop("left_shared", 0):
        st.info("You left a run shared with other visitors: it carries on for them.")
    if not runs:
        return
    polling = any(not r.finished for r in runs)
    waiting = polling and all(r.status == QUEUED for r in runs if not r.finished)

    inline = [True]  # False once this full run is over: the panel then runs on its own

    @st.fragment(run_every=poll_interval(waiting) if polling else None)
    def live_panel():
        get_manager().reap(connected)
        runs = group_runs(group)
        with panel("The live curves"):
            for run in runs:
                progress_line(run)
            mine = [r for r in runs if owns(r)]
            if any(not r.finished for r in mine):
                st.button("Stop", key=f"stop-{group}", on_click=stop_group, args=(group,), type="primary",
                          help="Stops your runs of this group after their current step; phi keeps what it learned.")
            elif not mine:
                st.caption("Shared link: you are watching another visitor's runs (read-only).")
            plot(live_figure(runs), key=f"curves-{group}")
        if not inline[0] and all(r.finished for r in runs):
            # the result cards below the panel appear; polling stops. Asked on every panel run
            # of its own, even after the full run that drew the cards: a timer tick sent just
            # before that run is queued behind it, and such a page was seen without its cards
            # (8 of 30 pages on 2 cores, BENCHMARKS.md): one more full run draws them.
            st.rerun()
        if waiting and any(r.status != QUEUED for r in runs):
            st.rerun()  # its turn came: poll at the live rate from now on

    live_panel()
    inline[0] = False


def poll_interval(waiting):
    """Seconds between a live panel's refreshes on this server: POLL_S, longer as the server holds
    more open pages (at most MAX_POLL_S), so that a lecture hall's refreshes do not outgrow it:
    300 pages on 3 servers refreshing at POLL_S overloaded them until pages went a minute or more
    without an update (BENCHMARKS.md). Pages waiting in line refresh half as often, and no more
    often than every WAITING_POLL_S."""
    live = min(MAX_POLL_S, max(POLL_S, open_pages() * POLL_S_PER_PAGE))
    return max(WAITING_POLL_S, 2 * live) if waiting else live


def open_pages():
    """Pages (sessions) open on this server now (outside a server: 0; AppTest's runtime is a
    mock, whose answers are not True)."""
    if not Runtime.exists():
        return 0
    runtime = Runtime.instance()
    return sum(runtime.is_active_session(s) is True for tabs in list(sessions_of_owner().values()) for s in list(tabs))


def hidden(control):
    """Whether this visitor's exercise link hides `control` (a teacher's hide=): then no part of
    the page shows it, the live panel included."""
    return control in ss.get("exercise", {}).get("hidden", ())


def progress_line(run):
    s = run_summary(run)
    exact = "-" if s["exact"] is None else f"{100 * s['exact']:.1f}%"
    others = run.other_owners(owner())  # this visitor's own other tabs are not others
    shared = f" · shared with {others} other visitor{'s' * (others > 1)}" if others else ""
    if run.status == QUEUED:
        place, wait = get_manager().place_in_line(run), get_manager().estimated_wait(run)
        if place is not None:
            text = (f"**{run.label}** · waiting: number {place} in line for a training slot"
                    + (f", about {wait:.0f} s" if wait is not None else "") + shared)
            st.progress(0.0, text=text)
            return
    solved = f" · solved at step {s['solved_step']} ({s['solved_s']:.1f} s)" if s["solved_step"] else ""
    budget = "" if hidden("steps") else f"/{s['steps']}"
    text = (f"**{run.label}** · {run.status} · step {s['step']}{budget} · "
            f"{s['steps_per_s']:.1f} steps/s · held-out exact match {exact}{solved}{shared}")
    st.progress(s["step"] / s["steps"] if s["steps"] else 0.0, text=text)
    if run.error:
        st.error(f"{run.label} failed: {run.error}")


def live_figure(runs):
    """runs_figure, rebuilt only when a run has new events since this session's last refresh."""
    state = tuple((r.id, len(r.events), r.status) for r in runs)
    cached = ss.get("live_figure")
    if not cached or cached[0] != state:
        ss["live_figure"] = cached = (state, runs_figure(runs))
    return cached[1]


MAX_POINTS = 250  # loss points per curve: enough for the eye, small to send twice a second


def runs_figure(runs):
    """Training loss (top, log scale) and held-out exact match (bottom) against step, one
    colour per run, in one figure with one legend: readable from the back of a room."""
    traces, used = [], set()
    for i, run in enumerate(runs):
        color = run_view(run).color
        if color in used:  # two runs of one method (the pretraining experiment): two colours
            color = next((c for c in PALETTE if c not in used), PALETTE[i % len(PALETTE)])
        used.add(color)
        events = run.events[:]  # a snapshot: the worker keeps appending
        evals = [e for e in events if e.eval_exact is not None]
        thin = events[::max(1, len(events) // MAX_POINTS)]
        style = dict(name=run.label, legendgroup=run.label,
                     line=dict(width=4, color=color))
        traces.append(dict(type="scatter", mode="lines", x=[e.step for e in thin], y=[e.loss for e in thin],
                           hovertemplate="step %{x}: loss %{y:.3g}", **style))
        traces.append(dict(type="scatter", mode="lines+markers", x=[e.step for e in evals],
                           y=[100 * e.eval_exact for e in evals], showlegend=False, yaxis="y2",
                           hovertemplate=f"step %{{x}}: %{{y:.1f}}% exact on {EVAL_SIZE} held-out", **style))
    steps = max((r.steps for r in runs), default=0)
    whole_budget = {} if hidden("steps") else dict(range=[0, steps * 1.02])  # the whole budget from the start
    return figure(traces, height=460, hovermode="closest",
                  xaxis=dict(title="step", anchor="y2", **whole_budget),
                  # plain-number log ticks from the curves' own range (log_ticks): 10, not 1e+1
                  yaxis=dict(title="training loss", type="log", domain=[0.58, 1]),
                  yaxis2=dict(title="exact match (%)", domain=[0, 0.42], range=[-3, 103]))


# ------------------------------------------------------------------ charts
FONT = dict(size=20)
GRID = dict(gridcolor="#e5e5e5", zerolinecolor="#cccccc", automargin=True)
# A white background set by hand: a named template costs ~10 ms a figure to build and copy.
LAYOUT = dict(font=FONT, template="none", paper_bgcolor="white", plot_bgcolor="white",
              margin=dict(l=70, r=30, t=60, b=60),
              legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, font=FONT),
              hoverlabel=dict(font=dict(size=18)))


def figure(traces, **layout):
    """A plotly figure as a plain dict (fast to build), styled for a projector. A log axis
    without tickvals or dtick of its own gets log_ticks over its traces' values."""
    for axis in [k for k in layout if k.startswith(("xaxis", "yaxis"))]:
        layout[axis] = {**GRID, **layout[axis]}
        if isinstance(layout[axis].get("title"), str):
            # plotly.js reads an axis title from title.text only: without plotly's validation
            # (skipped, see plot()) a plain string would draw no title at all
            layout[axis]["title"] = dict(text=layout[axis]["title"])
        if layout[axis].get("type") == "log" and not {"tickvals", "dtick"} & set(layout[axis]):
            values = _axis_values(traces, axis)
            layout[axis].update(log_ticks(min(values), max(values)) if values else dict(nticks=6))
    return {"data": traces, "layout": {**LAYOUT, **layout}}


def _axis_values(traces, axis):
    """The positive values the traces plot on `axis` ("xaxis", "yaxis2"...)."""
    letter, ref = axis[0], axis[0] + axis[5:]  # "yaxis2" -> "y", "y2"
    return [v for t in traces if t.get(f"{letter}axis", letter) == ref
            for v in t.get(letter) or () if isinstance(v, (int, float)) and 0 < v < float("inf")]


def log_ticks(low, high):
    """tickvals and ticktext for a log axis over [low, high] (both > 0), in plain numbers:
    1, 10, 100, 1,000 over more than two decades; 1, 2, 5, 10, 20, 50 within two; finer,
    then evenly spaced, where those leave fewer than three ticks in the range (a short
    run's loss from 1.6 to 2.9 would show "2" alone). Plotly's own log ticks label the 2s and 5s between
    decades in small type ("5, 2, 100, 5, 2")."""
    import math
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    ladders = [(1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7)][0 if math.log10(high / low) > 2.05 else 1:]
    for steps in ladders:
        values = [float(f"{m}e{e}") for e in range(first, last + 1) for m in steps]  # exact decimals
        if sum(low <= v <= high for v in values) >= 3:
            break
    else:
        values = even_ticks(low, high)
    return dict(tickmode="array", tickvals=values, ticktext=[_tick_text(v) for v in values])


def even_ticks(low, high):
    """Round values a step of 1, 0.5, 0.25 or 0.2 times a power of ten apart, the widest
    step with 3 or more inside [low, high], and one more past each end."""
    import math
    if high <= low:
        return [low]
    top = 10 ** math.ceil(math.log10(high - low))
    step = next(s for s in (top * m / 10 ** k for k in range(3) for m in (1, 0.5, 0.25, 0.2))
                if math.floor(high / s + 1e-9) - math.ceil(low / s - 1e-9) + 1 >= 3)  # (2.3 / 0.1 = 22.99...)
    first, last = math.ceil(low / step - 1e-9) - 1, math.floor(high / step + 1e-9) + 1
    return [v for v in (float(f"{i * step:.12g}") for i in range(first, last + 1)) if v > 0]


def _tick_text(v):
    return f"{v:,.0f}" if v >= 1 and v == int(v) else f"{v:g}"


def plot(fig, key=None, height=None):
    """Show a figure() dict. It is built by code, not typed by a user, so plotly's validation
    of a dict (~10 ms of GIL per chart, every rerun and live refresh) is skipped."""
    st.plotly_chart(_BuiltFigure(fig), theme=None, width="stretch", height=height or "content", key=key,
                    config={"displaylogo": False})


class _BuiltFigure(go.Figure):
    """A figure dict that st.plotly_chart takes as already validated."""

    def __init__(self, fig):  # deliberately no go.Figure.__init__: that is the validation
        self._fig = fig

    def to_dict(self):
        return self._fig


MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$=])")


def plain(text, limit=60):
    """User-given text (a name, a link's value) for a markdown string: every markdown
    character escaped, so `__x__` stays `__x__` and `![](http://...)` fetches nothing;
    cut to `limit` characters."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "…"
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def serving_metrics(times, n_rows):
    """The mixed batch against swapping phi per request, both for the same n_rows requests."""
    mixed, swap = times["mixed_s"], times["swap_s"]
    requests = f"{n_rows} request{'s' * (n_rows != 1)}"
    with st.container(horizontal=True, gap="large"):  # each metric as wide as it needs: nothing cut off
        st.metric(f"{requests} in one mixed batch", f"{1000 * mixed:.1f} ms", width="content",
                  help="every row with its own phi, in one pass per output digit")
        st.metric(f"{requests}, swapping phi", f"{1000 * swap:.1f} ms", width="content",
                  help=f"set_adapter, then one request at a time: {1000 * swap / n_rows:.2f} ms per request")
        ratio = swap / mixed
        st.metric("mixed batch against swapping", f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower",
                  width="content",
                  help="With few rows or one phi, routing rows costs more than it saves; it pays off with many tasks.")


def literal(text, limit=60):
    """Visitor-controlled text (a link's value, a file's name, a name) for any markdown string,
    as an inline code span: markdown reads nothing inside one, so no link, image, autolink or
    formatting can come of it. Cut to `limit` characters, on one line."""
    text = "".join(c if c.isprintable() else " " for c in str(text))
    if len(text) > limit:
        text = text[:limit] + "…"
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


PLAIN_WORDS = re.compile(r"[A-Za-z0-9]+([ _'-][A-Za-z0-9]+)*")  # markdown reads nothing in these


def as_text(text, limit=60):
    """Visitor text that reads as it is where markdown would find nothing in it ("Monday group",
    "lora-times_3"), else a literal: a name stays readable, a crafted one stays inert."""
    text = str(text)
    return text if len(text) <= limit and PLAIN_WORDS.fullmatch(text) else literal(text, limit)


def link_value(value, limit=40):
    """A value from the page's link, as a page echoes it: quoted, cut short, plain text."""
    value = str(value)
    return literal(repr(value if len(value) <= limit else value[:limit] + "…"), limit + 10)


def storage_sentence(phi_bytes, tasks, base_bytes):
    """What a bank or a class stores, counted plainly: n phi over k tasks on one base, against
    the same n fine-tunes kept as whole models (like with like: one model per phi)."""
    n, k = len(phi_bytes), len(set(tasks))
    total = base_bytes + sum(phi_bytes)
    return (f"**{n} phi** for {k} task{'s' * (k != 1)}, stored as one base ({human_bytes(base_bytes)}) plus their "
            f"files: **{human_bytes(total)}**, {total / base_bytes:.3f} base models. The same {n} fine-tune{'s' * (n != 1)} "
            f"as whole models (full fine-tuning, one copy each) would take {human_bytes(n * base_bytes)} "
            f"({n} base model{'s' * (n != 1)}).")


def fmt_num(x, near=None):
    """Short numbers for sentences: 1.5, 100, 1.005, 12,345. With `near`, as many digits
    as it takes not to read as `near`: fmt_num(1.00010001, near=1) is 1.0001, not 1."""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    digits = 4
    if near is not None and x != near and x != 0:
        import math
        digits = max(digits, math.floor(math.log10(abs(x))) - math.floor(math.log10(abs(x - near))) + 2)
    return f"{x:.{digits}g}"


def predictions_table(rows):
    """Inputs, targets and greedy outputs, wrong output digits highlighted in red."""
    right, wrong = ":green[:material/check_circle: right]", ":red[:material/cancel: wrong]"
    lines = ["| task | input | target | output | |", "|---|---|---|---|---|"]
    for r in rows:
        out = "".join(f":red-background[**{c}**]" if bad else c for c, bad in zip(r["output"], r["wrong"]))
        lines.append(f"| {plain(r['task'], 80)} | {r['input']} | {r['target']} | {out} | "
                     f"{right if r['correct'] else wrong} |")
    st.markdown("\n".join(lines))
