"""The store against a real SQLite file (no mocks): round trips, rights, caps, bad input and
hostile files that change nothing, 30 threads at once, a writer killed by SIGKILL mid-save,
and a restart that keeps every bank and class."""
import hashlib
import io
import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

import peftcore
from peftcore import LoraConfig, get_peft_model, library
from peftcore.service.store import (ENV_VAR, Limits, Store, StoreError, default_path, loader_check, new_token,
                            normalize_code, valid_token)

ROOT = Path(__file__).resolve().parent.parent
LORA_FILE = peftcore.library.LIBRARY_DIR / "lora" / "times_3" / "adapter_model.safetensors"
STRESS_S = float(os.environ.get("PEFT_STORE_STRESS_S", "8"))  # the issue asks a minute: set 60


@pytest.fixture(scope="module")
def lora_bytes():
    return LORA_FILE.read_bytes()


@pytest.fixture
def store(tmp_path, base):
    return Store(tmp_path / "store.sqlite3", base=base)


def variant(data, k):
    """The same phi with one weight nudged: another file (another sha256), still valid."""
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len])["__metadata__"]
    tensors = st_load(data)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float(k) * 1e-3
    return st_save(tensors, metadata=meta)


def snapshot(store):
    """Everything a refusal must leave as it was: every row of both tables."""
    with sqlite3.connect(store.path) as con:
        return (con.execute("SELECT * FROM phi ORDER BY id").fetchall(),
                con.execute("SELECT * FROM classes ORDER BY code").fetchall())


# ------------------------------------------------------------------ round trip
def test_save_list_load_delete_round_trip(store, lora_bytes, base):
    token = new_token()
    assert valid_token(token) and token != new_token()
    rec = store.save_phi(token, "lora-times_3", lora_bytes, eval_exact=1.0)
    lora = peftcore.methods.registry.METHODS["LORA"].preset.config  # the library's file is the preset's
    assert (rec.method, rec.task, rec.bytes, rec.num_params) == ("LORA", "times_3", len(lora_bytes),
                                                                 lora.num_params(base.config))
    assert rec.base_fingerprint == peftcore.fingerprint(base) and rec.eval_exact == 1.0
    assert rec.config["r"] == 1 and rec.owned_by(token) and not rec.owned_by(new_token())
    assert token not in json.dumps(rec.to_dict())  # the record holds the token's hash, not the token
    listed = store.list_phi(owner=token)
    assert [r.id for r in listed] == [rec.id] and listed[0] == rec
    assert store.list_phi(owner=new_token()) == []
    data = store.load_bytes(rec.id)
    assert data == lora_bytes
    bank = peftcore.PeftModel(base)
    peftcore.load_adapter(bank, "again", data)  # what comes out loads into a bank
    assert bank.adapter_task["again"] == "times_3"
    store.delete_phi(rec.id, owner=token)
    assert store.list_phi(owner=token) == []
    with pytest.raises(StoreError, match="no phi"):
        store.load_bytes(rec.id)


def test_every_shipped_method_saves(store):
    token = new_token()
    for name, d in library.entries():
        if name.endswith("times_3"):
            rec = store.save_phi(token, name, (d / "adapter_model.safetensors").read_bytes())
            assert rec.task == "times_3"
    assert sorted(r.method for r in store.list_phi(owner=token)) == sorted(peftcore.methods.registry.bankable())  # every one


def test_class_bank_and_personal_bank_are_separate(store, lora_bytes):
    code, key = store.create_class("Monday group")
    assert normalize_code(code.lower()[:3] + "-" + code[3:]) == code and key != code
    info = store.join(code.lower())
    assert (info.name, info.n_phi, info.is_open) == ("Monday group", 0, True)
    token = new_token()
    mine = store.save_phi(token, "p", lora_bytes)
    in_class = store.save_phi(token, "p", lora_bytes, class_code=code, author="Ada L.")  # same name, other place
    assert [r.id for r in store.list_phi(owner=token)] == [mine.id]
    assert [r.id for r in store.list_phi(class_code=code)] == [in_class.id]
    assert [r.id for r in store.list_phi(owner=token, class_code=code)] == [in_class.id]
    assert store.list_phi(class_code=code)[0].author == "Ada L."
    assert store.class_info(code).n_phi == 1 and store.class_info(code).bytes == len(lora_bytes)


# ------------------------------------------------------------------ rights
def test_rights_owner_teacher_and_strangers(store, lora_bytes):
    code, key = store.create_class("c")
    other_code, other_key = store.create_class("other")
    alice, bob = new_token(), new_token()
    a = store.save_phi(alice, "a", lora_bytes, class_code=code)
    b = store.save_phi(bob, "b", variant(lora_bytes, 1), class_code=code)
    own = store.save_phi(bob, "own", variant(lora_bytes, 2))  # bob's personal bank
    before = snapshot(store)
    for kwargs in [dict(owner=alice), dict(), dict(teacher_key=other_key), dict(teacher_key=new_token()),
                   dict(owner="not a token"), dict(teacher_key="x" * 200), dict(owner=alice, teacher_key=bob)]:
        with pytest.raises(StoreError, match="only your own"):
            store.delete_phi(b.id, **kwargs)
    with pytest.raises(StoreError, match="only your own"):
        store.delete_phi(own.id, teacher_key=key)  # a teacher key reaches only its class
    assert snapshot(store) == before
    assert not store.is_teacher(code, other_key) and store.is_teacher(code, key)
    store.delete_phi(b.id, teacher_key=key)
    store.delete_phi(a.id, owner=alice)
    store.delete_phi(own.id, owner=bob)
    assert store.list_phi(class_code=code) == [] and store.list_phi(owner=bob) == []


def test_close_class(store, lora_bytes):
    code, key = store.create_class("c")
    token = new_token()
    store.save_phi(token, "a", lora_bytes, class_code=code)
    with pytest.raises(StoreError, match="teacher key"):
        store.close_class(code, new_token())
    assert store.join(code).is_open
    store.close_class(code, key)
    with pytest.raises(StoreError, match="closed"):
        store.join(code)
    with pytest.raises(StoreError, match="closed"):
        store.save_phi(token, "b", variant(lora_bytes, 1), class_code=code)
    assert len(store.list_phi(class_code=code)) == 1  # the board stays readable


def test_delete_my_phi(store, lora_bytes):
    code, _ = store.create_class("c")
    me, you = new_token(), new_token()
    store.save_phi(me, "a", lora_bytes)
    store.save_phi(me, "b", lora_bytes, class_code=code)
    store.save_phi(you, "c", lora_bytes)
    assert store.delete_owner(me) == 2
    assert store.list_phi(owner=me) == [] and store.list_phi(class_code=code) == []
    assert len(store.list_phi(owner=you)) == 1


# ------------------------------------------------------------------ caps and bad input
def test_caps(tmp_path, base, lora_bytes):
    n = len(lora_bytes)
    store = Store(tmp_path / "s.sqlite3", base=base,
                  limits=Limits(student_count=3, student_bytes=10 * n, class_count=4, class_bytes=100 * n,
                                phi_bytes=n + 100))
    code, _ = store.create_class("c")
    me = new_token()
    for i in range(3):
        store.save_phi(me, f"p{i}", variant(lora_bytes, i), class_code=code)
    before = snapshot(store)
    with pytest.raises(StoreError, match="limit is 3"):
        store.save_phi(me, "p3", variant(lora_bytes, 3), class_code=code)
    store.save_phi(new_token(), "q", variant(lora_bytes, 4), class_code=code)
    with pytest.raises(StoreError, match="its limit is 4"):
        store.save_phi(new_token(), "r", variant(lora_bytes, 5), class_code=code)
    with pytest.raises(StoreError, match="over the"):
        store.save_phi(new_token(), "big", lora_bytes + b" " * 200)
    assert snapshot(store)[0][:3] == before[0]

    tight = Store(tmp_path / "s.sqlite3", base=base, limits=Limits(student_bytes=2 * n))
    you = new_token()
    tight.save_phi(you, "a", lora_bytes)
    tight.save_phi(you, "b", variant(lora_bytes, 1))
    with pytest.raises(StoreError, match="byte limit"):
        tight.save_phi(you, "c", variant(lora_bytes, 2))


def test_duplicates_are_refused(store, lora_bytes):
    me = new_token()
    store.save_phi(me, "a", lora_bytes)
    with pytest.raises(StoreError, match="already holds a phi named 'a'"):
        store.save_phi(me, "a", variant(lora_bytes, 1))
    with pytest.raises(StoreError, match="already in your bank, as 'a'"):
        store.save_phi(me, "b", lora_bytes)
    store.save_phi(new_token(), "a", lora_bytes)  # another student may save the same file


@pytest.mark.parametrize("bad", [
    dict(owner="short"), dict(owner="bad token with spaces!!!!!!"), dict(owner=None), dict(owner=12345),
    dict(name=""), dict(name="../../etc/passwd"), dict(name="a" * 65), dict(name="spa ce"), dict(name=None),
    dict(class_code="nope"), dict(class_code="ABC10O"), dict(class_code="ZZZZZZ"), dict(class_code=""),
    dict(author="<script>alert(1)</script>"), dict(author="x" * 41), dict(eval_exact=2.0), dict(eval_exact="1"),
    dict(data="a string"), dict(data=b""),
])
def test_bad_input_is_refused_and_changes_nothing(store, lora_bytes, bad):
    store.create_class("c")
    before = snapshot(store)
    args = {**dict(owner=new_token(), name="ok", data=lora_bytes), **bad}
    with pytest.raises(StoreError):
        store.save_phi(args.pop("owner"), args.pop("name"), args.pop("data"), **args)
    assert snapshot(store) == before


@pytest.mark.parametrize("call", [
    lambda s: s.list_phi(owner="nope"), lambda s: s.list_phi(class_code="bad!"), lambda s: s.list_phi(),
    lambda s: s.class_info("ZZZZZZ"), lambda s: s.class_info(None), lambda s: s.join("x" * 1000),
    lambda s: s.load_bytes("1; DROP TABLE phi"), lambda s: s.load_bytes(-1), lambda s: s.load_bytes(10**6),
    lambda s: s.delete_phi("abc"), lambda s: s.close_class("ZZZZZZ", new_token()), lambda s: s.create_class(""),
    lambda s: s.create_class("x" * 41), lambda s: s.delete_owner("nope"),
])
def test_bad_lookups_give_store_errors(store, lora_bytes, call):
    store.save_phi(new_token(), "a", lora_bytes)
    before = snapshot(store)
    with pytest.raises(StoreError):
        call(store)
    assert snapshot(store) == before


def hostile_files(lora_bytes, base):
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(3)}, buf)  # a pickle
    other = get_peft_model(peftcore.random_base(seed=3), LoraConfig(r=1, lora_alpha=4, target_modules=["q", "v"]))
    full = get_peft_model(base, peftcore.FullFineTuneConfig())
    nan = st_load(lora_bytes)
    nan[sorted(nan)[0]] = torch.full_like(nan[sorted(nan)[0]], float("nan"))
    header_len = int.from_bytes(lora_bytes[:8], "little")
    meta = json.loads(lora_bytes[8:8 + header_len])["__metadata__"]
    return {
        "pickle": (buf.getvalue(), "not a safetensors file"),
        "pickle protocol bytes": (b"\x80\x04\x95" + b"cos\nsystem\n" * 10, "not a"),
        "oversized": (lora_bytes + b"\0" * (3 * 2**20), "over the"),
        "wrong base": (peftcore.adapter_to_bytes(other), "another base"),
        "truncated": (lora_bytes[:len(lora_bytes) // 2], "not a valid safetensors"),
        "NaN weights": (st_save(nan, metadata=meta), "non-finite"),
        "full model": (peftcore.adapter_to_bytes(full), "over the"),  # and with a larger cap: "whole model"
    }


def test_hostile_uploads_change_nothing(store, lora_bytes, base, caplog):
    code, key = store.create_class("c")
    token = new_token()
    store.save_phi(token, "a", lora_bytes, class_code=code)
    before = snapshot(store)
    caplog.set_level(logging.DEBUG)
    for what, (data, reason) in hostile_files(lora_bytes, base).items():
        with pytest.raises(StoreError, match=reason) as e:
            store.save_phi(token, "evil", data, class_code=code)
        for secret in (token, key, code):
            assert secret not in str(e.value), f"{what}: a secret in the message"
    assert snapshot(store) == before
    assert not any(s in caplog.text for s in (token, key, code))
    roomy = Store(store.path, base=base, limits=Limits(phi_bytes=8 * 2**20))
    with pytest.raises(StoreError, match="whole model"):
        roomy.save_phi(token, "full", hostile_files(lora_bytes, base)["full model"][0])
    assert snapshot(store) == before


def test_secrets_are_never_in_messages_or_on_disk(store, lora_bytes):
    code, key = store.create_class("c")
    token = new_token()
    messages = []
    for call in [lambda: store.close_class(code, token), lambda: store.save_phi(token, "bad name", lora_bytes),
                 lambda: store.delete_phi(1, owner=token, teacher_key=token)]:
        with pytest.raises(StoreError) as e:
            call()
        messages.append(str(e.value))
    store.save_phi(token, "a", lora_bytes, class_code=code)
    store.checkpoint()
    raw = store.path.read_bytes()
    assert token.encode() not in raw and key.encode() not in raw  # only their sha256
    assert not any(s in m for m in messages for s in (token, key))


def test_store_path_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "x" / "s.db"))
    assert default_path() == tmp_path / "x" / "s.db"
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_path() == tmp_path / "data" / "peft-playground" / "store.sqlite3"
    s = Store()  # no set-up needed: the folder is created
    assert s.path.exists() and s.stats()["phi"] == 0


def test_a_store_without_a_base_reads_but_never_saves(tmp_path, base, lora_bytes):
    writer = Store(tmp_path / "s.db", base=base)
    token = new_token()
    rec = writer.save_phi(token, "a", lora_bytes)
    reader = Store(tmp_path / "s.db")
    assert reader.load_bytes(rec.id) == lora_bytes
    with pytest.raises(StoreError, match="cannot save"):
        reader.save_phi(token, "b", variant(lora_bytes, 1))


# ------------------------------------------------------------------ restart and crash
def test_restart_keeps_every_bank_and_class(tmp_path, base, lora_bytes):
    path = tmp_path / "s.sqlite3"
    first = Store(path, base=base)
    code, key = first.create_class("Tuesday")
    alice, bob = new_token(), new_token()
    ids = [first.save_phi(alice, "a", lora_bytes).id, first.save_phi(bob, "b", lora_bytes, class_code=code).id]
    del first
    again = Store(path, base=base)
    assert [r.id for r in again.list_phi(owner=alice)] == ids[:1]
    assert [r.id for r in again.list_phi(class_code=code)] == ids[1:]
    assert again.class_info(code).name == "Tuesday" and again.is_teacher(code, key)
    assert all(again.load_bytes(i) == lora_bytes for i in ids)
    again.delete_phi(ids[1], teacher_key=key)


CHILD = textwrap.dedent("""
    import sys, torch, peftcore
    from peftcore.service.store import Store, loader_check
    from tests.test_store import variant
    torch.set_num_threads(1)
    token, data = sys.argv[2], open(sys.argv[3], "rb").read()
    # the loader check once; the variants differ in one weight, so the loop is all SQLite
    # writes and the kill lands inside one most of the time
    facts = loader_check(peftcore.load_base())(data)
    store = Store(sys.argv[1], check=lambda _: facts)
    i = 0
    while True:
        rec = store.save_phi(token, f"p{i}", variant(data, i))
        print(rec.id, rec.sha256, flush=True)
        i += 1
""")


@pytest.mark.parametrize("commits_before_kill", [3, 25])
def test_a_writer_killed_mid_save_leaves_no_half_phi(tmp_path, base, commits_before_kill):
    path, token = tmp_path / "s.sqlite3", new_token()
    Store(path)  # the file exists before the child starts
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), token, str(LORA_FILE)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    committed = {}
    try:
        for line in child.stdout:
            phi_id, digest = line.split()
            committed[int(phi_id)] = digest
            if len(committed) >= commits_before_kill:
                time.sleep(random.uniform(0, 0.004))  # land somewhere inside a later save
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert len(committed) >= commits_before_kill, child.stderr.read()[-2000:]
    store = Store(path, base=base)  # reopens: SQLite rolls back the open transaction from the WAL
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    records = store.list_phi(owner=token)
    ids = [r.id for r in records]
    assert set(committed) <= set(ids)  # every committed phi is there
    # the saves that committed form a prefix p0, p1, ... (the child saves one after another);
    # more than were read may have committed while the kill was on its way: whole, like the rest
    assert [r.name for r in records] == [f"p{i}" for i in range(len(records))]
    bank = peftcore.PeftModel(base)
    for r in records:  # and every row is whole: its bytes match and load
        data = store.load_bytes(r.id)
        assert hashlib.sha256(data).hexdigest() == committed.get(r.id, r.sha256)
        peftcore.load_adapter(bank, f"p{r.id}", data)
    store.save_phi(token, "after", variant(LORA_FILE.read_bytes(), 10**5))  # and takes writes again


# ------------------------------------------------------------------ 30 threads at once
@pytest.mark.realtime  # a bound on the wall clock
def test_thirty_threads_save_list_and_delete_at_once(tmp_path, base, lora_bytes):
    """Each thread is a student: save a new phi (into the class or its own bank), list its
    bank and the class board, sometimes delete one of its own. Afterwards the store holds
    exactly what the threads believe they saved and did not delete."""
    real_check, check_times, last_check = loader_check(base), [], threading.local()

    def check(data):  # the real loader check, timed: how much of a save is torch, not SQLite
        t = time.perf_counter()
        try:
            return real_check(data)
        finally:
            last_check.s = time.perf_counter() - t
            check_times.append(last_check.s)

    store = Store(tmp_path / "s.sqlite3", check=check,
                  limits=Limits(student_count=10**6, student_bytes=2**40, class_count=10**6, class_bytes=2**40))
    code, key = store.create_class("stress")
    n_threads, deadline = 30, time.monotonic() + STRESS_S
    kept = [dict() for _ in range(n_threads)]
    latency = {"save": [], "save-check": [], "list": [], "delete": []}
    errors, lock = [], threading.Lock()
    start = threading.Barrier(n_threads)

    def student(i):
        token, mine = new_token(), kept[i]
        times = {k: [] for k in latency}
        j = 0
        try:
            start.wait()
            while time.monotonic() < deadline:
                data = variant(lora_bytes, i * 10_000 + j)
                t = time.perf_counter()
                rec = store.save_phi(token, f"s{i}-{j}", data, class_code=code if j % 2 else None, eval_exact=0.5)
                times["save"].append(time.perf_counter() - t)
                times["save-check"].append(times["save"][-1] - last_check.s)  # the SQLite part, queue included
                mine[rec.id] = (rec.sha256, rec.class_code)
                t = time.perf_counter()
                listed = store.list_phi(owner=token) + store.list_phi(owner=token, class_code=code)
                board = store.list_phi(class_code=code)
                times["list"].append((time.perf_counter() - t) / 3)
                assert {r.id for r in listed} == set(mine), "a thread's own phi went missing or appeared"
                assert {i for i, (_, c) in mine.items() if c} <= {r.id for r in board}
                if j % 3 == 2:
                    victim = sorted(mine)[len(mine) // 2]
                    t = time.perf_counter()
                    if j % 6 == 5 and mine[victim][1]:
                        store.delete_phi(victim, teacher_key=key)  # the teacher deletes too
                    else:
                        store.delete_phi(victim, owner=token)
                    times["delete"].append(time.perf_counter() - t)
                    del mine[victim]
                j += 1
        except Exception as e:  # noqa: BLE001 - every failure is collected and reported
            with lock:
                errors.append(f"thread {i}: {type(e).__name__}: {e}")
        with lock:
            for k in latency:
                latency[k] += times[k]

    threads = [threading.Thread(target=student, args=(i,)) for i in range(n_threads)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    assert not errors, errors[:5]
    want = {phi_id: v for mine in kept for phi_id, v in mine.items()}
    with sqlite3.connect(store.path) as con:
        rows = con.execute("SELECT id, sha256, class_code FROM phi").fetchall()
    assert len(rows) == len({r[0] for r in rows}), "a duplicated phi"
    assert {r[0]: (r[1], r[2]) for r in rows} == want, "a lost, duplicated or ghost phi"
    assert all(store.load_bytes(i) for i in list(want)[:50])
    stats = store.stats()

    def pct(xs, q):
        xs = sorted(xs)
        return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    print(f"\n30 threads for {wall:.1f} s: {len(latency['save'])} saves, {len(latency['list']) * 3} lists, "
          f"{len(latency['delete'])} deletes, {len(want)} phi kept")
    for k, xs in [*latency.items(), ("check", check_times)]:
        print(f"  {k:6s} p50 {pct(xs, .5):7.1f} ms  p95 {pct(xs, .95):7.1f} ms  max {pct(xs, 1):7.1f} ms")
    print(f"  store {stats['file_bytes']:,} bytes on disk for {stats['phi']} phi of {stats['phi_bytes']:,} bytes: "
          f"{stats['file_bytes'] / max(stats['phi'], 1):,.0f} bytes per phi, file {len(lora_bytes):,} bytes")
    assert len(latency["save"]) >= n_threads


def test_store_size_per_phi(tmp_path, base, lora_bytes):
    """Bytes on disk per stored phi against the file's own size (printed for the record)."""
    store = Store(tmp_path / "s.sqlite3", base=base)
    token, n = new_token(), 40
    for i in range(n):
        store.save_phi(token, f"p{i}", variant(lora_bytes, i))
    store.checkpoint()
    size = store.stats()["file_bytes"]
    empty = Store(tmp_path / "empty.sqlite3").stats()["file_bytes"]
    per = (size - empty) / n
    print(f"\nstore size per phi: {per:,.0f} bytes on disk for a {len(lora_bytes):,}-byte LoRA file "
          f"({per / len(lora_bytes):.3f}x)")
    assert len(lora_bytes) <= per < 1.2 * len(lora_bytes) + 4096


# ------------------------------------------------------------------ one file stored once; quotas; usage
def blob_count(store):
    with sqlite3.connect(store.path) as con:
        return con.execute("SELECT COUNT(*) FROM blobs").fetchone()[0]


def test_a_file_is_stored_once_however_many_rows_name_it(store, lora_bytes):
    code, key = store.create_class("c")
    tokens = [new_token() for _ in range(5)]
    recs = [store.save_phi(t, "same", lora_bytes, class_code=code) for t in tokens]
    recs.append(store.save_phi(tokens[0], "mine", lora_bytes))  # the same file in a personal bank
    assert blob_count(store) == 1 and store.stats()["phi_bytes"] == len(lora_bytes) and store.stats()["phi"] == 6
    assert store.usage(code) == dict(phi=5, bytes=len(lora_bytes), students=5, phi_limit=120,
                                     bytes_limit=Limits().class_bytes)
    info = store.class_info(code)
    assert (info.n_phi, info.bytes, info.students) == (5, len(lora_bytes), 5)
    other = store.save_phi(tokens[1], "other", variant(lora_bytes, 1), class_code=code)
    assert store.usage(code)["bytes"] == len(lora_bytes) + other.bytes and blob_count(store) == 2
    for r in recs[:-1]:  # every row but the last naming the file: the file stays
        store.delete_phi(r.id, teacher_key=key)
        assert store.load_bytes(recs[-1].id) == lora_bytes
    assert blob_count(store) == 2
    store.delete_owner(tokens[0])  # the last row naming it: the file goes too
    assert blob_count(store) == 1 and store.stats()["phi_bytes"] == other.bytes


def test_bytes_caps_count_what_a_row_adds(tmp_path, base, lora_bytes):
    n = len(lora_bytes)
    store = Store(tmp_path / "s.sqlite3", base=base, limits=Limits(class_bytes=n + 100, total_bytes=2 * n + 100,
                                                                   student_bytes=n + 100))
    code, _ = store.create_class("c")
    for i in range(6):  # one file, six students: it counts once in the class and in the store
        store.save_phi(new_token(), "same", lora_bytes, class_code=code)
    with pytest.raises(StoreError, match="over its"):
        store.save_phi(new_token(), "other", variant(lora_bytes, 1), class_code=code)
    me = new_token()
    store.save_phi(me, "a", lora_bytes)
    store.save_phi(me, "a", lora_bytes, class_code=code)  # the same file again: adds no bytes of mine
    with pytest.raises(StoreError, match="over your"):
        store.save_phi(me, "b", variant(lora_bytes, 2))
    store.save_phi(new_token(), "b", variant(lora_bytes, 2))
    with pytest.raises(StoreError, match="the store is full"):
        store.save_phi(new_token(), "c", variant(lora_bytes, 3))


def test_client_caps(tmp_path, base, lora_bytes):
    n = len(lora_bytes)
    store = Store(tmp_path / "s.sqlite3", base=base, limits=Limits(client_count=3, client_bytes=2 * n + 100))
    for i in range(3):  # a new token each time, one address: the address's cap holds
        store.save_phi(new_token(), f"p{i}", variant(lora_bytes, i % 2), client="10.0.0.7")
    before = snapshot(store)
    with pytest.raises(StoreError, match="from your address, the limit is 3"):
        store.save_phi(new_token(), "p3", variant(lora_bytes, 0), client="10.0.0.7")
    store.save_phi(new_token(), "p3", variant(lora_bytes, 0), client="10.0.0.8")  # another address
    roomy = Store(store.path, base=base, limits=Limits(client_count=100, client_bytes=2 * n + 100))
    with pytest.raises(StoreError, match="from your address would take"):
        roomy.save_phi(new_token(), "p4", variant(lora_bytes, 5), client="10.0.0.7")
    roomy.save_phi(new_token(), "p4", variant(lora_bytes, 1), client="10.0.0.7")  # a file it has: no bytes
    assert snapshot(store)[0][:3] == before[0]
    raw = store.path.read_bytes() + Path(f"{store.path}-wal").read_bytes()
    assert b"10.0.0.7" not in raw  # kept as its sha256


@pytest.mark.realtime  # a bound on the wall clock
def test_wrong_join_codes_are_rate_limited(tmp_path, lora_bytes):
    store = Store(tmp_path / "s.sqlite3", limits=Limits(join_failures=3, join_window_s=0.5))
    code, _ = store.create_class("c")
    wrong = next(c for c in ("ABCDEF", "GHJKMN", "PQRSTU") if c != code)
    for _ in range(3):
        with pytest.raises(StoreError, match="no class has that code"):
            store.join(wrong, client="1.2.3.4")
    for guess in (wrong, code, code.lower()):  # refused, the right code too: no more guessing
        with pytest.raises(StoreError, match="too many wrong join codes from this address: wait a minute"):
            store.join(guess, client="1.2.3.4")
    with pytest.raises(StoreError, match="too many"):
        store.class_info(code, client="1.2.3.4")  # a ?class= link is the same door
    assert store.join(code, client="5.6.7.8").is_open  # another address is not held up
    assert store.join(code).is_open  # nor a caller that gives none
    time.sleep(0.6)
    assert store.join(code, client="1.2.3.4").is_open  # the window has passed


# ------------------------------------------------------------------ schema 1 -> 2
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE classes (code TEXT PRIMARY KEY, name TEXT NOT NULL, teacher_key_hash TEXT NOT NULL,
                      created REAL NOT NULL, closed REAL);
CREATE TABLE phi (id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, author TEXT NOT NULL DEFAULT '',
    class_code TEXT REFERENCES classes(code), name TEXT NOT NULL, method TEXT NOT NULL, task TEXT NOT NULL,
    config TEXT NOT NULL, num_params INTEGER NOT NULL, bytes INTEGER NOT NULL, eval_exact REAL,
    base_fingerprint TEXT NOT NULL, sha256 TEXT NOT NULL, created REAL NOT NULL, data BLOB NOT NULL);
CREATE UNIQUE INDEX phi_place_name ON phi (owner, COALESCE(class_code, ''), name);
CREATE INDEX phi_owner ON phi (owner, class_code, bytes, sha256);
CREATE INDEX phi_class ON phi (class_code, bytes);
CREATE INDEX phi_bytes ON phi (bytes);
"""


def v1_store(path, lora_bytes):
    """A store file as schema 1 wrote it (each row holding its file): three rows (the second
    another student's, in a class), two files, the last id deleted (ids are not reused after)."""
    files = [lora_bytes, lora_bytes, variant(lora_bytes, 1), variant(lora_bytes, 2)]
    token = new_token()
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(V1_SCHEMA)
        con.execute("INSERT INTO classes VALUES ('ABCDEF', 'old class', 'h', 0, NULL)")
        for i, data in enumerate(files):
            con.execute("INSERT INTO phi (owner, author, class_code, name, method, task, config, num_params, bytes, "
                        "eval_exact, base_fingerprint, sha256, created, data) VALUES (?, 'Ada', ?, ?, 'LORA', "
                        "'times_3', '{\"r\": 1}', 6656, ?, NULL, 'fp', ?, 0, ?)",
                        (hashlib.sha256((token if i != 1 else "someone else").encode()).hexdigest(),
                         "ABCDEF" if i == 1 else None, f"p{i}",
                         len(data), hashlib.sha256(data).hexdigest(), data))
        con.execute("DELETE FROM phi WHERE id=4")
    return token, {i + 1: data for i, data in enumerate(files[:3])}


def test_schema_1_store_moves_to_blobs_and_keeps_every_row(tmp_path, base, lora_bytes):
    path = tmp_path / "old.sqlite3"
    token, files = v1_store(path, lora_bytes)
    reader = Store(path, read_only=True)  # read-only: read as it is, not moved
    assert {i: reader.load_bytes(i) for i in files} == files
    assert reader.stats()["phi"] == 3 and reader.class_info("ABCDEF").n_phi == 1
    store = Store(path, base=base)
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT value FROM meta").fetchone()[0] == "2"
        assert "data" not in [r[1] for r in con.execute("PRAGMA table_info(phi)")]
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert blob_count(store) == 2 and {i: store.load_bytes(i) for i in files} == files
    assert [r.id for r in store.list_phi(owner=token)] == [1, 3] and store.get_phi(2).author == "Ada"
    bank = peftcore.PeftModel(base)
    for i in files:
        peftcore.load_adapter(bank, f"p{i}", store.load_bytes(i))
    rec = store.save_phi(token, "new", variant(lora_bytes, 3))
    assert rec.id == 5  # the deleted id 4 is not reused
    store.delete_owner(token)
    assert blob_count(store) == 1 and store.load_bytes(2) == lora_bytes  # the class's row keeps its file
    assert Store(path, base=base).load_bytes(2) == lora_bytes  # opening again moves nothing twice
