"""Who is who: the owner and bank tokens the server minted (cookies, never links), a shared bank
link's offer, the class a visitor follows, teacher mode, and which tabs of a visitor are open."""
import re
import secrets
from urllib.parse import urlencode, urlsplit, urlunsplit

import streamlit as st
from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

from peftcore.service import store as store_mod
from peftcore.service.store import StoreError

from .frame import ss
from .resources import device, store


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
        set_cookie(BANK_COOKIE, ss["bank_token"])  # queued: sent at the end of this very run (app.py)
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
                 "Your own bank is unchanged.", icon="⚠️", duration="infinite")  # until read and closed
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
                 "on this machine may have set it): it was ignored and replaced.", icon="⚠️", duration="infinite")
    code = st.query_params.get("class")
    if code:
        ss["class_code"] = code  # checked by the Class page
    elif ss.get("class_code"):
        st.query_params["class"] = ss["class_code"]


def forget_class():
    ss.pop("class_code", None)
    if "class" in st.query_params:
        del st.query_params["class"]




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
    """Set a cookie in this browser (for a year unless `max_age` says otherwise), once per
    session and value: queued for send_cookies. Only tokens travel this way (letters, digits,
    '_' and '-'): nothing to escape."""
    assert re.fullmatch(r"[A-Za-z0-9_-]+", name + value)
    sent = ss.setdefault("cookies_sent", {})
    if st.context.cookies.get(name) == value or sent.get(name) == value:
        return
    sent[name] = value
    ss.setdefault("cookies_queued", []).append(f"document.cookie = '{name}={value}; path=/; max-age={int(max_age)}; "
                                               "SameSite=Strict';")


def clear_cookie(name):
    """Delete a cookie from this browser, once per session (queued for send_cookies)."""
    sent = ss.setdefault("cookies_sent", {})
    if name not in st.context.cookies and name not in sent or sent.get(name, "") is None:
        return
    sent[name] = None
    ss.setdefault("cookies_queued", []).append(f"document.cookie = '{name}=; path=/; max-age=0; SameSite=Strict';")


def send_cookies(every_run=True):
    """Send the queued cookie scripts. app.py calls it at a fixed place before the page, where
    it draws exactly one element on every run (an empty one when nothing is queued): an element
    that came and went would shift every element after it, which the browser then rebuilds,
    and the control a keyboard user just changed would lose its focus. After the page
    (every_run=False) it sends only what the page queued (a bank made by a save), at the end."""
    queued = ss.pop("cookies_queued", [])
    if queued:
        st.html(f"<script>{' '.join(queued)}</script>", unsafe_allow_javascript=True)
    elif every_run:
        st.empty()


def connected(token):
    """Whether any tab of this owner is still open (outside a server, as in AppTest: yes)."""
    if not Runtime.exists():
        return True
    sessions = sessions_of_owner().get(token, set())
    alive = {s for s in sessions if Runtime.instance().is_active_session(s)}
    sessions.intersection_update(alive)
    return bool(alive)
