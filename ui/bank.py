"""This session's bank of phi: the library and the visitor's saved phi on the shared base, added,
removed and listed."""
import streamlit as st

import peftcore
from peftcore import library
from peftcore.serialization import task_label
from peftcore.service.store import StoreError

from .frame import ss, view_of
from .resources import base_facts, client, device, get_base, store
from .visitor import bank_token


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
                         task=task_label(model.adapter_task.get(name), model.adapter_merged_from.get(name)),
                         params=n,
                         phi_pct=100 * n / facts["params"],
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
