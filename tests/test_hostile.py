"""The catalogue of hostile inputs and store faults (issue 14). Each case is refused with a
clear message (never a traceback, a raw sqlite3 error or a server path), and after every
fault the store is checked whole: every row that committed is there and loads.

To add a case, add a row to a table:
- FILES: an uploaded phi file (case, builder from a good file's bytes, message fragment);
  it is tried on the loader and on the store;
- NAMES: a name typed into a form (case, save_phi or create_class argument, value, fragment);
  ACCEPTED: names that are fine, and what is stored;
- the fault tests below (busy, damaged, read-only, full, poisoned rows) each end in
  assert_store_whole.
"""
import functools
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

import peftcore
from peftcore import AdapterLoadError, PeftModel, library
from peftcore.service.store import Limits, Store, StoreError, clean_name, new_token, normalize_code, valid_token
from apptest import app

ROOT = Path(__file__).resolve().parent.parent
GOOD = (library.LIBRARY_DIR / "lora" / "times_3" / "adapter_model.safetensors").read_bytes()


# ------------------------------------------------------------------ building bad files
def _meta(data):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])["__metadata__"]


def rewrite(data, tensors=None, config=None):
    """`data` with its tensors and/or its header config edited in place by the given functions."""
    t, cfg = dict(st_load(data)), json.loads(_meta(data)["adapter_config"])
    if tensors:
        tensors(t)
    if config:
        config(cfg)
    return st_save(t, metadata={"adapter_config": json.dumps(cfg)})


def with_raw_config(data, raw):
    return st_save(dict(st_load(data)), metadata={"adapter_config": raw})


def raw_header(header: bytes):
    return len(header).to_bytes(8, "little") + header


def first(t):
    return sorted(t)[0]


def cast(dtype, value=None):
    """The first tensor stored as `dtype` (filled with `value` if given)."""
    def edit(t):
        k = first(t)
        t[k] = torch.full_like(t[k], value, dtype=dtype) if value is not None else t[k].to(dtype)
    return edit


def record(**fields):
    return lambda c: c["peftcore"].update(fields)


def field(**fields):
    return lambda c: c.update(fields)


DEEP = 100_000
FILES = [
    # nesting and size, bounded before the parser recurses
    ("deep JSON header", lambda d: raw_header(b'{"a":' + b"[" * DEEP + b"]" * DEEP + b"}"), "nests"),
    ("deep JSON config", lambda d: with_raw_config(d, "[" * DEEP + "]" * DEEP), "nests"),
    ("deep object config", lambda d: with_raw_config(d, '{"a":' * 5000 + "1" + "}" * 5000), "nests"),
    ("config 17 deep", lambda d: rewrite(d, config=field(x=json.loads("[" * 17 + "]" * 17))), "nests"),
    ("header over 1 MB", lambda d: st_save(dict(st_load(d)), metadata={**_meta(d), "pad": " " * 2**20}),
     "over the"),
    ("header of 400,000 escaped quotes", lambda d: raw_header(b'"' + b'\\"' * 400_000), "not valid JSON"),
    ("header not UTF-8", lambda d: raw_header(b'{"\xff\xfe":1}'), "not UTF-8"),
    ("header not JSON", lambda d: raw_header(b"{nope"), "not valid JSON"),
    ("header length past the end", lambda d: (10**9).to_bytes(8, "little") + d[8:], "safetensors"),
    ("a pickle", lambda d: b"\x80\x04\x95" + b"cos\nsystem\n" * 10, "safetensors"),
    # dtypes: only plain floats, cast to the model's dtype
    ("float8_e4m3fn", lambda d: rewrite(d, cast(torch.float8_e4m3fn)), "float8_e4m3fn"),
    ("float8_e5m2", lambda d: rewrite(d, cast(torch.float8_e5m2)), "float8_e5m2"),
    ("int8", lambda d: rewrite(d, cast(torch.int8, 1)), "int8"),
    ("int64", lambda d: rewrite(d, cast(torch.int64, 1)), "int64"),
    ("bool", lambda d: rewrite(d, cast(torch.bool, True)), "bool"),
    ("complex64", lambda d: rewrite(d, cast(torch.complex64)), "complex64"),
    # finite after every conversion: what will be served
    ("float64 1e300 is inf as float32", lambda d: rewrite(d, cast(torch.float64, 1e300)), "non-finite"),
    ("float64 -1e39", lambda d: rewrite(d, cast(torch.float64, -1e39)), "non-finite"),
    ("float16 inf", lambda d: rewrite(d, cast(torch.float16, float("inf"))), "non-finite"),
    ("bfloat16 NaN", lambda d: rewrite(d, cast(torch.bfloat16, float("nan"))), "non-finite"),
    ("float32 NaN", lambda d: rewrite(d, cast(torch.float32, float("nan"))), "non-finite"),
    # fields of the wrong type: refused at load, never saved
    ("task a number", lambda d: rewrite(d, config=record(task=5)), "peftcore.task"),
    ("task a list", lambda d: rewrite(d, config=record(task=["times_3"])), "peftcore.task"),
    ("task an object", lambda d: rewrite(d, config=record(task={"a": 1})), "peftcore.task"),
    ("task with a new line", lambda d: rewrite(d, config=record(task="times_3\n")), "peftcore.task"),
    ("task as markdown", lambda d: rewrite(d, config=record(task="![x](http://evil/x.png)")), "peftcore.task"),
    ("task 10 KB long", lambda d: rewrite(d, config=record(task="a" * 10_000)), "peftcore.task"),
    ("method an object", lambda d: rewrite(d, config=record(method={"x": 1})), "peftcore.method"),
    ("fingerprint a number", lambda d: rewrite(d, config=record(base_fingerprint=5)), "base_fingerprint"),
    ("fingerprint not hex", lambda d: rewrite(d, config=record(base_fingerprint="zz" * 32)), "base_fingerprint"),
    ("num_params a string", lambda d: rewrite(d, config=record(num_params="6656")), "num_params"),
    ("version a list", lambda d: rewrite(d, config=record(version=[0, 1])), "peftcore.version"),
    ("peftcore record a list", lambda d: rewrite(d, config=field(peftcore=[1])), "peftcore"),
    ("peft_type a list", lambda d: rewrite(d, config=lambda c: (c.update(peft_type=["LORA"]),
                                                                c["peftcore"].pop("method"))), "peft_type"),
    ("target_modules a string", lambda d: rewrite(d, config=field(target_modules="qv")), "target_modules"),
    ("target_modules nested", lambda d: rewrite(d, config=field(target_modules=[["q"]])), "target_modules"),
    ("target_modules numbers", lambda d: rewrite(d, config=field(target_modules=[1, 2])), "target_modules"),
    ("r a string", lambda d: rewrite(d, config=field(r="1")), "r must be"),
    ("r a bool", lambda d: rewrite(d, config=field(r=True)), "r must be"),
    ("r huge", lambda d: rewrite(d, config=field(r=10**30)), "r must be"),
    ("lora_alpha NaN", lambda d: rewrite(d, config=field(lora_alpha=float("nan"))), "lora_alpha"),
    ("config an array", lambda d: with_raw_config(d, "[1, 2]"), "JSON object"),
]


ADAPTER = (library.LIBRARY_DIR / "adapter" / "times_3" / "adapter_model.safetensors").read_bytes()  # after the MLP only


@pytest.mark.parametrize("value", ["mlp", ["ffn"], [["mlp"]], [], ["mlp", "mlp"], [1]], ids=repr)
def test_an_adapter_file_placed_nowhere_it_can_go_is_refused(base, value):
    bank = PeftModel(base)
    with pytest.raises(AdapterLoadError, match="target_sublayers"):
        peftcore.load_adapter(bank, "evil", rewrite(ADAPTER, config=field(target_sublayers=value)))
    assert not bank.peft_config


def test_an_adapter_file_that_claims_a_sublayer_it_has_no_tensors_for_is_refused(base):
    assert json.loads(_meta(ADAPTER)["adapter_config"])["target_sublayers"] == ["mlp"]
    bank = PeftModel(base)
    with pytest.raises(AdapterLoadError):
        peftcore.load_adapter(bank, "evil", rewrite(ADAPTER, config=field(target_sublayers=["attn", "mlp"])))
    assert not bank.peft_config


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory, base):
    """One store for the whole file catalogue, holding a committed row that must survive."""
    store = Store(tmp_path_factory.mktemp("hostile") / "s.sqlite3", base=base)
    code, _ = store.create_class("hostile")
    token = new_token()
    kept = store.save_phi(token, "kept", GOOD, class_code=code)
    return store, code, token, kept.id


@pytest.mark.parametrize("case, build, says", FILES, ids=[c[0] for c in FILES])
def test_hostile_file_is_refused(base, hostile_store, case, build, says):
    data = build(GOOD)
    bank = PeftModel(base)
    with pytest.raises(AdapterLoadError, match=says):
        peftcore.load_adapter(bank, "evil", data)
    assert not bank.peft_config and not bank.adapter_task  # nothing half loaded
    store, code, token, kept = hostile_store
    with pytest.raises(StoreError, match=says) as e:
        store.save_phi(token, "evil", data, class_code=code)
    assert token not in str(e.value) and str(store.path.parent) not in str(e.value)
    assert_store_whole(store, {kept})


def test_the_good_file_and_its_harmless_variants_load(base):
    """The builders change only what they say: a float64 or bfloat16 copy of the good file loads."""
    for data in (GOOD, rewrite(GOOD, cast(torch.float64)), rewrite(GOOD, cast(torch.bfloat16)),
                 rewrite(GOOD, config=record(task="")), rewrite(GOOD, cast(torch.float16, 1000.0)),
                 rewrite(GOOD, config=field(note="[" * 5000))):  # brackets inside a string do not nest
        peftcore.load_adapter(PeftModel(base), "ok", data)


# ------------------------------------------------------------------ names
LONG = "Ada Lovelace, Countess of Lovelace, first programmer"  # pasted: 52 characters
NAMES = [
    ("phi name with a trailing new line", "name", "ok\n", "control characters"),
    ("phi name with a tab", "name", "o\tk", "control characters"),
    ("phi name with a space", "name", "spa ce", "may hold only"),
    ("phi name a path", "name", "../../etc/passwd", "may hold only"),
    ("phi name 65 long", "name", "a" * 65, "at most 64"),
    ("phi name empty", "name", "", "cannot be empty"),
    ("phi name not text", "name", 12, "must be text"),
    ("author with a trailing new line", "author", "Ada\n", "control characters"),
    ("author with a carriage return", "author", "Ada\r", "control characters"),
    ("author with a line separator", "author", "Ada\u2028Bob", "control characters"),
    ("author with a right-to-left override", "author", "Ada\u202egnp.exe", "control characters"),
    ("author with a zero-width space", "author", "A\u200bda", "control characters"),
    ("author with a NUL", "author", "Ada\0", "control characters"),
    ("author pasted over 40 characters", "author", LONG, "at most 40 characters; this one has 52"),
    ("author as markdown", "author", "**Ada** [x](http://evil)", "may hold only"),
    ("author as HTML", "author", "<script>alert(1)</script>", "may hold only"),
    ("author an image", "author", "![x](http://evil/x.png)", "may hold only"),
    ("author not text", "author", ["Ada"], "must be text"),
    ("class name with a new line", "class", "Monday\n", "control characters"),
    ("class name over 40", "class", "x" * 41, "at most 40"),
    ("class name empty", "class", "   ", "cannot be empty"),
    ("class name as markdown", "class", "# big", "may hold only"),
]
ACCEPTED = [  # (kind, typed, stored): NFKC makes look-alikes what they read as
    ("name", "ｌｏｒａ－ａｄｄ", "lora-add"),   # full-width letters and hyphen
    ("author", "Ａｄａ", "Ada"),
    ("author", "ﬁona", "fiona"),                  # the ligature fi
    ("author", "  Zoë O'Brien-Smith  ", "Zoë O'Brien-Smith"),
    ("author", "Ada\u00a0L.", "Ada L."),          # a no-break space is a space
    ("author", "李小龙", "李小龙"),
    ("class", "Monday group ②", None),            # ② is NFKC '2'
]


@pytest.mark.parametrize("case, kind, value, says", NAMES, ids=[c[0] for c in NAMES])
def test_hostile_name_is_refused(hostile_store, case, kind, value, says):
    store, code, token, kept = hostile_store
    with pytest.raises(StoreError, match=says):
        if kind == "class":
            store.create_class(value)
        else:
            store.save_phi(token, **{"name": "fine", "author": "", kind: value}, data=GOOD, class_code=code)
    assert_store_whole(store, {kept})


@pytest.mark.parametrize("kind, typed, stored", ACCEPTED)
def test_names_are_normalised(tmp_path, base, kind, typed, stored):
    store = Store(tmp_path / "s.sqlite3", base=base)
    if kind == "class":
        code, _ = store.create_class(typed)
        assert store.class_info(code).name == "Monday group 2"
        return
    rec = store.save_phi(new_token(), **{"name": "fine", kind: typed}, data=GOOD)
    assert getattr(rec, kind) == stored and getattr(store.get_phi(rec.id), kind) == stored
    assert clean_name(typed, "x", 64, chars="id" if kind == "name" else "display") == stored


def test_codes_and_tokens_as_typed():
    assert normalize_code("abc234") == "ABC234" and normalize_code(" abc-234 ") == "ABC234"
    assert normalize_code("AbC 234") == "ABC234" and normalize_code("ABC234\n") == "ABC234"
    assert normalize_code("ABC23") is None and normalize_code("ABC2345") is None
    token = new_token()
    assert valid_token(token) and not valid_token(token + "\n") and not valid_token("\n" + token)


# ------------------------------------------------------------------ the store, whole
@functools.lru_cache(maxsize=1)
def _base():
    return peftcore.load_base()


def assert_store_whole(store, expected_ids, base=None):
    """Every row that committed is there and loads: exactly `expected_ids`, the file passes
    SQLite's integrity check, every row's file is there once and matches its checksum, no file
    is left that no row names, and each loads into a bank over the base."""
    base = base if base is not None else _base()
    with closing(sqlite3.connect(f"file:{store.path}?mode=ro", uri=True)) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {r[0] for r in con.execute("SELECT id FROM phi")}
        assert con.execute("SELECT COUNT(*) FROM blobs WHERE sha256 NOT IN (SELECT sha256 FROM phi)").fetchone()[0] == 0
    assert ids == set(expected_ids), f"rows lost {set(expected_ids) - ids}, ghosts {ids - set(expected_ids)}"
    bank = PeftModel(base)
    for phi_id in sorted(ids):
        rec, data = store.get_phi(phi_id), store.load_bytes(phi_id)
        assert hashlib.sha256(data).hexdigest() == rec.sha256
        peftcore.load_adapter(bank, f"p{phi_id}", data)


def variant(data, k):
    """The good file with one weight nudged: another valid file, another sha256."""
    return rewrite(data, lambda t: t.__setitem__(first(t), t[first(t)].clone().fill_(k * 1e-3)))


@pytest.fixture
def filled(tmp_path, base):
    """A store with a class and four committed rows from two students."""
    store = Store(tmp_path / "s.sqlite3", base=base, wait_s=0.5)
    code, key = store.create_class("c")
    a, b = new_token(), new_token()
    ids = {store.save_phi(a, "a0", GOOD).id, store.save_phi(a, "a1", variant(GOOD, 1), class_code=code).id,
           store.save_phi(b, "b0", GOOD, class_code=code).id, store.save_phi(b, "b1", variant(GOOD, 2)).id}
    return store, code, key, a, b, ids


def no_leak(e, store):
    msg = str(e.value)
    assert isinstance(e.value, StoreError) and "sqlite" not in msg.lower() and str(store.path.parent) not in msg


# ------------------------------------------------------------------ faults: busy
@pytest.fixture
def other_process_writing(filled):
    """Another connection (as another process would) holds SQLite's write lock."""
    store = filled[0]
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    yield other
    if other.in_transaction:
        other.execute("ROLLBACK")
    other.close()


@pytest.mark.realtime  # a bound on the wall clock
def test_busy_store_says_so_within_its_wait(filled, other_process_writing):
    store, code, key, a, b, ids = filled
    for call in (lambda: store.save_phi(a, "new", variant(GOOD, 3)), lambda: store.delete_owner(b),
                 lambda: store.create_class("x"), lambda: store.close_class(code, key)):
        t = time.monotonic()
        with pytest.raises(StoreError, match="busy.*try again") as e:
            call()
        assert time.monotonic() - t < store.wait_s + 1.0
        no_leak(e, store)
    assert len(store.list_phi(owner=a)) == 1 and store.class_info(code).n_phi == 2  # reads go on
    other_process_writing.execute("ROLLBACK")
    ids.add(store.save_phi(a, "new", variant(GOOD, 3)).id)
    assert_store_whole(store, ids)


@pytest.mark.realtime  # a bound on the wall clock
def test_a_write_never_waits_behind_another_threads_retries(filled, other_process_writing):
    """Thread A retries against the other process's lock; B, a write in the same process
    started later, gets its own bounded wait (not A's plus its own), and when the lock goes
    both go through at once."""
    store, code, key, a, b, ids = filled
    store.wait_s = 1.5
    done = {}

    def write(name, start_after, call):
        time.sleep(start_after)
        t = time.monotonic()
        try:
            done[name] = ("ok", call(), time.monotonic() - t)
        except StoreError as e:
            done[name] = (str(e), None, time.monotonic() - t)

    threads = [threading.Thread(target=write, args=("A", 0, lambda: store.save_phi(a, "A", variant(GOOD, 4)).id)),
               threading.Thread(target=write, args=("B", 0.5, lambda: store.create_class("B")))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "busy" in done["A"][0] and "busy" in done["B"][0]
    assert done["B"][2] < store.wait_s + 0.5, "B waited behind A's retries"
    # the lock goes while both retry: both commit within moments
    done.clear()
    threads = [threading.Thread(target=write, args=("A", 0, lambda: store.save_phi(a, "A", variant(GOOD, 4)).id)),
               threading.Thread(target=write, args=("B", 0.2, lambda: store.create_class("B")))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    other_process_writing.execute("ROLLBACK")
    for t in threads:
        t.join()
    assert done["A"][0] == "ok" and done["B"][0] == "ok" and max(done["A"][2], done["B"][2]) < 1.0
    ids.add(done["A"][1])
    assert_store_whole(store, ids)


@pytest.mark.realtime  # a bound on the wall clock
def test_an_exclusive_lock_blocks_reads_briefly_and_says_busy(filled):
    store, code, key, a, b, ids = filled
    store.close()  # the store's connection comes back after the lock is taken
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("PRAGMA locking_mode=EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")
    other.execute("UPDATE classes SET name=name")  # takes the lock on the WAL index too
    other.execute("COMMIT")
    try:
        t = time.monotonic()
        with pytest.raises(StoreError) as e:
            store.list_phi(owner=a)
        assert time.monotonic() - t < store.wait_s + 1.0
        no_leak(e, store)
    finally:
        other.close()
    assert_store_whole(store, ids)


# ------------------------------------------------------------------ faults: damaged files
def test_a_file_that_is_not_a_database(tmp_path):
    path = tmp_path / "s.sqlite3"
    path.write_bytes(b"this is not a database, it is a note\n" * 200)
    with pytest.raises(StoreError, match="damaged") as e:
        Store(path)
    assert str(tmp_path) not in str(e.value) and e.value.reason == "damaged"


def test_damaged_pages_give_store_errors_only(filled):
    store, code, key, a, b, ids = filled
    store.checkpoint()
    store.close()
    raw = bytearray(store.path.read_bytes())
    raw[4096 * 2:4096 * 6] = os.urandom(4096 * 4)  # some tables' pages turned to noise
    store.path.write_bytes(bytes(raw))
    calls = [lambda s: s.list_phi(owner=a), lambda s: s.list_phi(class_code=code), lambda s: s.stats(),
             lambda s: s.class_info(code), lambda s: [s.load_bytes(i) for i in ids],
             lambda s: s.save_phi(a, "x", variant(GOOD, 9)), lambda s: s.delete_owner(a), lambda s: s.create_class("y")]
    try:
        s = Store(store.path, base=_base())
    except StoreError as e:  # refused at open: fine, with the store's own error
        assert e.reason in ("damaged", "failed")
        return
    for call in calls:
        try:
            call(s)
        except StoreError as e:
            assert "sqlite" not in str(e).lower() and str(store.path.parent) not in str(e)


def test_a_folder_that_cannot_hold_a_store(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot be opened or created") as e:
        Store(blocker / "sub" / "s.sqlite3")
    assert str(tmp_path) not in str(e.value)


# ------------------------------------------------------------------ faults: read-only
RO_CHILD = textwrap.dedent("""
    import json, sys
    from peftcore.service.store import Store, StoreError
    path, code, token = sys.argv[1:4]
    s = Store(path, check=lambda d: {})
    out = dict(read_only=s.read_only, board=[r.id for r in s.list_phi(class_code=code)],
               mine=[r.id for r in s.list_phi(owner=token)], n_phi=s.class_info(code).n_phi,
               sha=[__import__("hashlib").sha256(s.load_bytes(r.id)).hexdigest() == r.sha256
                    for r in s.list_phi(class_code=code)], stats=s.stats()["phi"])
    for what, call in [("save", lambda: s.save_phi(token, "x", b"x" * 100)), ("delete", lambda: s.delete_owner(token)),
                       ("create", lambda: s.create_class("y"))]:
        try:
            call()
            out[what] = "done"
        except StoreError as e:
            out[what] = str(e)
    print(json.dumps(out))
""")


def run_without_write_rights(args):
    """Run RO_CHILD as a user who may not write there: as root, root without the capabilities
    that override file modes (a 0444 file is writable to plain root)."""
    cmd = [sys.executable, "-c", RO_CHILD, *args]
    if os.getuid() == 0:
        cmd = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
               "--bounding-set=-dac_override,-dac_read_search", *cmd]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("what", ["file 0444", "folder read-only"])
def test_a_read_only_store_can_still_be_read(tmp_path, base, what):
    if os.getuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root without setpriv: no way to take write rights away")
    folder = tmp_path / "ro"
    folder.mkdir()
    store = Store(folder / "s.sqlite3", base=base)
    code, _ = store.create_class("c")
    token = new_token()
    ids = {store.save_phi(token, "a", GOOD, class_code=code).id, store.save_phi(token, "b", variant(GOOD, 1)).id}
    store.close()  # the last connection folds the WAL in and removes -wal and -shm
    os.chmod(folder / "s.sqlite3", 0o444)
    os.chmod(folder, 0o555 if what == "folder read-only" else 0o777)
    try:
        out = run_without_write_rights([str(folder / "s.sqlite3"), code, token])
    finally:
        os.chmod(folder, 0o755)
        os.chmod(folder / "s.sqlite3", 0o644)
    assert out["read_only"] and out["n_phi"] == 1 and len(out["board"]) == 1 and len(out["mine"]) == 1
    assert all(out["sha"]) and out["stats"] == 2
    for op in ("save", "delete", "create"):
        assert "read-only" in out[op] and "sqlite" not in out[op].lower() and str(folder) not in out[op]
    assert_store_whole(Store(folder / "s.sqlite3", base=base), ids)


def test_read_only_on_request(filled):
    store, code, key, a, b, ids = filled
    ro = Store(store.path, read_only=True)
    assert len(ro.list_phi(owner=a)) == 1 and ro.class_info(code).n_phi == 2 and ro.load_bytes(min(ids))
    for call in (lambda: ro.delete_owner(a), lambda: ro.create_class("x"), lambda: ro.close_class(code, key)):
        with pytest.raises(StoreError, match="read-only"):
            call()
    assert_store_whole(store, ids)


# ------------------------------------------------------------------ faults: a full disk
def fill_disk(store):
    """From now on this thread's connection may not grow the file: SQLITE_FULL, as on a full
    disk. (max_page_count holds for one connection only; the store's is this thread's.)"""
    with store._connect() as con:
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count={pages}")


def test_a_full_disk_refuses_saves_and_still_deletes(filled):
    store, code, key, a, b, ids = filled
    fill_disk(store)
    for i in range(3):  # whatever free pages there were are soon used up
        with pytest.raises(StoreError, match="the store is full") as e:
            for j in range(20):
                ids.add(store.save_phi(new_token(), f"f{i}-{j}", variant(GOOD, 100 + 20 * i + j)).id)
    no_leak(e, store)
    assert_store_whole(store, ids)
    mine = {r.id for r in store.list_phi(owner=a) + store.list_phi(owner=a, class_code=code)}
    assert store.delete_owner(a) == 2  # "Delete my saved phi"
    board = store.list_phi(owner=b, class_code=code)
    store.delete_phi(board[0].id, teacher_key=key)  # the teacher's delete
    ids -= mine | {board[0].id}
    assert_store_whole(store, ids)
    ids.add(store.save_phi(a, "again", variant(GOOD, 7)).id)  # the room made takes a save again
    assert_store_whole(store, ids)


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 6 MB file system (tmpfs): needs root's right to mount, else skipped."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if sys.platform != "linux" or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                                                 capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_really_full_disk_still_deletes(tiny_disk, base):
    """A disk filled by saves (not SQLite's page cap): the saves that filled it are in the
    write-ahead log, and a delete needs new space for its own log frames. The store's reserve
    (`<path>-reserve`) is given back for the delete; then the freed room takes saves again."""
    facts = peftcore.service.store.loader_check(base)(GOOD)
    store = Store(tiny_disk / "s.sqlite3", check=lambda d: facts,
                  limits=Limits(student_count=10**6, student_bytes=2**40))
    token, ids = new_token(), set()
    with pytest.raises(StoreError, match="the store is full") as e:
        for i in range(1000):
            ids.add(store.save_phi(token, f"p{i}", variant(GOOD, i)).id)
    assert e.value.reason == "full" and shutil.disk_usage(tiny_disk).free < 64 * 2**10 and len(ids) > 20
    assert (tiny_disk / "s.sqlite3-reserve").exists()
    assert_store_whole(store, ids, base)
    first_id = min(ids)
    store.delete_phi(first_id, owner=token)
    assert store.delete_owner(token) == len(ids) - 1  # "Delete my saved phi"
    ids = {store.save_phi(token, f"again{i}", variant(GOOD, 10**5 + i)).id for i in range(10)}
    assert_store_whole(store, ids, base)
    store.close()


# ------------------------------------------------------------------ faults: poisoned rows
def test_a_poisoned_row_lists_fails_to_load_and_deletes(filled, base):
    """Rows that no save today can make (a file saved before the loader refused a numeric task,
    a config column that is not JSON, a file gone missing): the bank still lists, each bad row
    fails to load with the store's or the loader's error, and each can be deleted."""
    store, code, key, a, b, ids = filled
    poisoned = rewrite(GOOD, config=record(task=5))
    sha = hashlib.sha256(poisoned).hexdigest()
    with sqlite3.connect(store.path) as con:
        owner = con.execute("SELECT owner FROM phi WHERE name='a0'").fetchone()[0]
        con.execute("INSERT INTO blobs VALUES (?, ?, ?)", (sha, len(poisoned), poisoned))
        con.execute("INSERT INTO phi (owner, author, class_code, name, method, task, config, num_params, bytes,"
                    " eval_exact, base_fingerprint, sha256, created) VALUES (?, '', NULL, 'old', 'LORA', 5, '{bad',"
                    " 'x', ?, NULL, 'fp', ?, 0)", (owner, len(poisoned), sha))
        con.execute("DELETE FROM blobs WHERE sha256 = (SELECT sha256 FROM phi WHERE name='a1')")  # its file is gone
    listed = store.list_phi(owner=a) + store.list_phi(owner=a, class_code=code)
    assert {r.name for r in listed} == {"a0", "a1", "old"}
    bank = PeftModel(base)
    for r in listed:
        try:
            peftcore.load_adapter(bank, f"p{r.id}", store.load_bytes(r.id))
        except (StoreError, AdapterLoadError) as e:
            assert r.name in ("a1", "old"), e
        else:
            assert r.name == "a0"
    assert store.delete_owner(a) == 3
    assert_store_whole(store, ids - {r.id for r in listed})


# ------------------------------------------------------------------ what a visitor sends to the pages
LINKS = [  # (page, link, where the echo shows) : crafted values come back as plain text, cut short
    ("app_pages/storage.py", {"p": "![x](http://evil.example/x.png)" + "A" * 100_000}, "toast"),
    ("app_pages/train.py", {"only": "[click](http://evil.example)", "hide": "**x**" * 20_000,
                            "lock": "<img src=http://evil.example/y.png>", "r": "![](http://evil.example/z)"}, "warning"),
]


@pytest.mark.parametrize("page, query, where", LINKS, ids=[p for p, _, _ in LINKS])
def test_link_values_are_echoed_as_plain_text_cut_short(page, query, where):
    from ui import link_value, plain
    at = app()
    at.query_params.update(query)
    at.run()  # the default page, storage, says it in this first run (its sliders then drop the value)
    if page != "app_pages/storage.py":
        at.switch_page(page).run()
    assert not at.exception
    shown = " ".join(t.value for t in at.get(where))
    for value in query.values():
        assert link_value(value) in shown, (value[:80], shown[:300])  # quoted, cut, every markdown mark escaped
    assert len(shown) < 2_000, len(shown)  # 100 KB of link is not shown whole
    assert plain("![x](http://e/x.png) <img> **b**") == r"\!\[x\]\(http\://e/x\.png\) \<img\> \*\*b\*\*"


def test_serve_all_is_computed_once_per_state_of_the_class(monkeypatch, base):
    """Any student may press "Serve all" again and again, in many sessions: the class's mixed
    batch costs its CPU once per state of the class."""
    from apptest import open_page
    from peftcore import analysis
    store = Store(os.environ["PEFT_STORE"], base=base)
    code, _ = store.create_class("serve once")
    name, directory = library.entries()[0]
    data = peftcore.adapter_to_bytes(PeftModel.from_pretrained(base, directory), "default")
    store.save_phi(new_token(), "one", data, class_code=code)
    calls, real = [], analysis.serve_report
    monkeypatch.setattr(analysis, "serve_report", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(2):  # two students, each pressing twice
        at = open_page("app_pages/classroom.py", {"class": code})
        for _ in range(2):
            at.button(key="class_serve").click().run()
            assert not at.exception and at.get("metric")
    assert len(calls) == 1


def test_removing_a_saved_phi_says_it_is_for_good_and_asks_first(base):
    from apptest import open_page
    store = Store(os.environ["PEFT_STORE"], base=base)
    token = store.mint_token("bank")
    name, directory = library.entries()[0]
    store.save_phi(token, "mine", peftcore.adapter_to_bytes(PeftModel.from_pretrained(base, directory), "default"))
    at = open_page("app_pages/serve.py", {"bank": token})
    at.button(key="take_offered_bank").click().run()  # the private link: the bank taken on purpose
    at.selectbox(key="remove_name").set_value("mine").run()
    words = " ".join(m.value for m in at.markdown)
    assert "from the store for good" in words and at.button(key="remove").label == "Yes, delete it"
    at.button(key="remove").click().run()
    assert store.list_phi(owner=token) == []
    at.selectbox(key="remove_name").set_value(at.selectbox(key="remove_name").options[0]).run()
    assert at.button(key="remove").label == "Remove"  # a library phi: this session only
    assert "this session's bank only" in at.button(key="remove").help
