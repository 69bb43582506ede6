"""What one server process shares across sessions: the frozen bases, the run manager (in this
process or on Ray), the store, the device and seed a page uses."""
import os

import streamlit as st

import peftcore
from peftcore import analysis
from peftcore.pretrain import evaluate as evaluate_pretraining, first_loss
from peftcore.service import store as store_mod
from peftcore.service.runs import RunManager, RunService
from peftcore.service.warmup import start_warm_up

from .frame import log, ss


MAX_SESSION_RUNS = max(4, len(peftcore.METHODS))  # runs one visitor may have training or waiting, across
                                                  # tabs: a race of every method at once


@st.cache_resource(show_spinner="Loading the frozen base...")
def get_base(device):
    """The frozen pretrained base, once per device for the whole server."""
    return peftcore.load_base(device=device)


@st.cache_resource(show_spinner="Building a random frozen base...")
def get_random_base(device):
    """The control: a randomly initialised frozen base of the same shape."""
    return peftcore.random_base(device=device)


@st.cache_resource
def get_manager() -> RunService:
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


def base_of(which, device):
    """The server's shared frozen base a run's model wraps, by name (pretrained, random)."""
    return BASES[which](device)


def make_manager(executor="inprocess") -> RunService:
    """The run service: on Ray (workers elsewhere; the queue shared by every web server of
    the cluster, RAY_ADDRESS) or in this process. Ray not there: logged, and in-process."""
    if executor == "ray":
        from peftcore.service.ray_executor import RayUnavailable, ray_manager
        try:
            return ray_manager(base_of=base_of,
                               num_cpus=int(os.environ["PEFT_RAY_CPUS"]) if os.environ.get("PEFT_RAY_CPUS") else None,
                               name=os.environ.get("PEFT_RAY_SERVICE") or "run-service", max_per_owner=MAX_SESSION_RUNS,
                               max_per_client=per_address_cap())
        except RayUnavailable as e:
            log.error("PEFT_EXECUTOR=ray, but %s: training runs in this web process instead.", e)
    elif executor != "inprocess":
        log.error("PEFT_EXECUTOR=%r is not an executor (inprocess, ray): training runs in this process.", executor)
    manager = RunManager(max_per_owner=MAX_SESSION_RUNS, max_per_client=per_address_cap(),  # across tabs; per address
                         base_of=base_of)
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
