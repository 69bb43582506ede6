"""PEFT Playground: freeze the base, train a sliver.  Run with `streamlit run app.py`.

The entrypoint sets up the page, the navigation over app_pages/ and the sidebar every page
shares (device, seed, reset). The pages hold the widgets; peftcore does the torch work.

The folder is not called pages/: Streamlit treats a pages/ folder as a legacy (v1)
multipage app until the entrypoint has run once, so the first visitor of a deep link such
as /train after a server start would get the page without this file (no sidebar, no
layout), and AppTest would rerun pages without it.
"""
from pathlib import Path

import streamlit as st

import ui

# The favicon is the app's own file, sent inline as a data: URL. A ":material/...:" page_icon
# makes every browser fetch the icon from fonts.gstatic.com (issue 7): that fails offline and
# tells Google who visits. The navigation's icons are a font Streamlit itself serves.
FAVICON = Path(__file__).parent / "assets" / "favicon.svg"
st.set_page_config(page_title="PEFT Playground", page_icon=str(FAVICON), layout="wide")

PAGES = [
    st.Page("app_pages/storage.py", title="One base, many tasks", icon=":material/inventory_2:", default=True),
    st.Page("app_pages/train.py", title="Train a sliver", icon=":material/model_training:"),
    st.Page("app_pages/serve.py", title="Many tasks at once", icon=":material/dns:"),
    st.Page("app_pages/inside.py", title="Inside: why it works", icon=":material/biotech:"),
    st.Page("app_pages/classroom.py", title="Class", icon=":material/groups:"),
]


KEPT_ON_RESET = ("bank_token", "class_code", "teacher_handles")  # who the visitor is, not their settings


def reset_session():
    """Forget this tab's settings and runs: stop its runs, clear its state and its link.
    The visitor's bank, class and teacher keys stay (and come back into the link)."""
    ui.stop_session_runs()
    kept = {k: st.session_state[k] for k in KEPT_ON_RESET if k in st.session_state}
    st.session_state.clear()
    st.query_params.clear()
    st.session_state.update(kept)


def sidebar():
    with st.sidebar:
        st.markdown("### PEFT Playground")
        devices = ui.available_devices()
        st.selectbox("Device", devices, index=devices.index(ui.device()), key="device",
                     help="Where this session trains and serves. The frozen base is loaded once per device "
                          "and shared by every visitor.")
        st.number_input("Seed", min_value=0, max_value=9999, value=0, step=1, key="seed",
                        help="Same seed, same run (on CPU): the batches drawn, the initial phi, the samples shown.")
        manager = ui.get_manager()
        st.caption(f"Base: {ui.base_facts(ui.device())['params']:,} frozen parameters on **{ui.device()}**. "
                   f"Training on this server now: {len(manager.active())} run(s), "
                   f"{manager.max_concurrent} at a time.")
        my_bank()
        st.button("Reset my session", on_click=reset_session, width="stretch",
                  help="Stops your runs and forgets this tab's settings. Your saved phi stay in the store. "
                       "Other visitors are not affected.")


def my_bank():
    """The private link that moves a student's saved phi to another device, and a confirmed
    way to delete them."""
    link = ui.private_bank_link()
    if not link:
        return
    with st.popover("Move my bank to another device", width="stretch"):
        st.write("Open this link on your other device to bring your saved phi there. It is private: "
                 "whoever opens it can use and delete your phi, so never paste it in the class chat. "
                 "Your address bar never carries it: pasting that is safe.")
        st.code(link, language=None, wrap_lines=True)
    with st.popover("Delete my saved phi", width="stretch"):
        st.write("Deletes every phi you saved, from the store and from any class. This cannot be undone.")
        if st.button("Yes, delete them", type="primary", key="delete_mine"):
            try:
                st.success(f"Deleted {ui.delete_my_phi()} saved phi.")
            except ui.StoreError as e:
                st.error(f"Not deleted: {e}.")


navigation = st.navigation(PAGES)
ui.page_frame()
ui.identify()
ui.follow_visitor()
ui.send_cookies()
ui.bank_offer()
sidebar()
navigation.run()
ui.send_cookies(every_run=False)
