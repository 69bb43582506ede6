"""The store: saved phi and classes in one SQLite file, so a phi outlives the browser tab.

Never imports streamlit. Standard library `sqlite3` in WAL mode: readers never wait for the
writer, writers queue on `busy_timeout`, and every write is one transaction, so a process
killed in the middle of a save leaves the save either whole or absent.

Who may do what rests on two random secrets, neither of which the store keeps:
- a student's *bank token* (`new_token()`, kept in the student's URL) owns the phi saved with
  it; the store keeps only its sha256, so the file on disk cannot be used to delete anything;
- a class has a short *join code* (shared with the room: it lets students see the board and
  save into the class) and a separate *teacher key* (shown once; kept as a sha256) that
  deletes any phi in the class and closes it.
Tokens, codes and keys never appear in an exception message or a log line.

Every file passes peftcore's loader checks before it enters the store (format, config, base
fingerprint, tensor names, shapes, values: `serialization.load_adapter` on a scratch model
over the base), and caps bound what one student, one class and the whole store may hold.

    store = Store(default_path(), base=peftcore.load_base())
    token = new_token()
    code, key = store.create_class("Monday group")
    rec = store.save_phi(token, "lora-add_5", data, class_code=code, author="Ada")
    store.list_phi(class_code=code); store.load_bytes(rec.id); store.delete_phi(rec.id, owner=token)
"""
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .peft_model import CONFIGS, FullFineTuneConfig
from .serialization import MAX_FILE_BYTES, AdapterLoadError, adapter_config, load_adapter

ENV_VAR = "PEFT_STORE"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 15_000
NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")            # the bank's adapter names
AUTHOR_RE = re.compile(r"^[\w .'\-]{1,40}$")               # a student's display name
TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{22,64}$")          # secrets.token_urlsafe(16) and longer
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"          # no 0/O, 1/I/L: read off a projector
CODE_LEN = 6                                               # 31**6 ~ 8.9e8 codes
CODE_RE = re.compile(f"^[{CODE_ALPHABET}]{{{CODE_LEN}}}$")
# methods whose phi share a base in a bank (a full fine-tune is a whole model)
BANKABLE = tuple(t for t in CONFIGS if t != FullFineTuneConfig.peft_type)


class StoreError(ValueError):
    """Why the store refused: the message is safe to show a user (it never holds a secret)."""


@dataclass(frozen=True)
class Limits:
    """Caps on what one student (bank token), one class and the whole store may hold."""
    phi_bytes: int = 2 * 2**20            # one phi file; LoRA here is ~32 KB, an adapter ~140 KB
    student_count: int = 50               # phi per bank token, personal and class together
    student_bytes: int = 16 * 2**20
    class_count: int = 120                # phi in one class (the mixed batch serves them all)
    class_bytes: int = 64 * 2**20
    total_bytes: int = 2 * 2**30          # the whole store: tokens are free to mint
    classes: int = 10_000


@dataclass(frozen=True)
class PhiRecord:
    """One stored phi, without its bytes. `owner` is the sha256 of its bank token."""
    id: int
    owner: str
    author: str
    class_code: Optional[str]
    name: str
    method: str
    task: str
    config: dict = field(repr=False)
    num_params: int
    bytes: int
    eval_exact: Optional[float]
    base_fingerprint: str
    sha256: str
    created: float

    def owned_by(self, token):
        return token is not None and hmac.compare_digest(self.owner, _hash(token))

    def to_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class ClassInfo:
    code: str
    name: str
    created: float
    closed: Optional[float]
    n_phi: int
    bytes: int

    @property
    def is_open(self):
        return self.closed is None


def default_path():
    """$PEFT_STORE, else $XDG_DATA_HOME/peft-playground/store.sqlite3 (~/.local/share/...)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "peft-playground" / "store.sqlite3"


def new_token():
    """A student's bank token: 128 random bits, URL-safe (22 characters)."""
    return secrets.token_urlsafe(16)


def valid_token(token):
    return isinstance(token, str) and bool(TOKEN_RE.match(token))


def normalize_code(code):
    """A join code as typed ('abc-def ', 'ABCDEF') -> 'ABCDEF', or None if it cannot be one."""
    if not isinstance(code, str):
        return None
    c = re.sub(r"[\s\-]", "", code).upper()
    return c if CODE_RE.match(c) else None


def _hash(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_token(token, what="bank token"):
    if not valid_token(token):
        raise StoreError(f"that is not a valid {what}: expected 22-64 letters, digits, '_' or '-'")
    return _hash(token)


def _check_code(code):
    c = normalize_code(code)
    if c is None:
        raise StoreError(f"that is not a class code: a code is {CODE_LEN} letters and digits, e.g. ABC234")
    return c


def loader_check(base):
    """The default check: parse `data` with peftcore's loader onto a scratch PeftModel over
    `base` (format, config, base fingerprint, tensor names, shapes, finite values) and return
    the file's facts. Raises AdapterLoadError with the reason. The base is never modified."""
    from .peft_model import PeftModel

    def check(data):
        model = PeftModel(base)  # a view: shares the base's tensors, copies none
        load_adapter(model, "probe", data)
        cfg = adapter_config(model, "probe")
        record = cfg.pop("peftcore")
        return dict(method=record["method"], task=record.get("task") or "?", config=cfg,
                    num_params=model.adapter_num_params("probe"), base_fingerprint=model.base_fingerprint)
    return check


class Store:
    """Saved phi and classes in the SQLite file at `path` (created on first use).

    `base` (the frozen base) or `check` (data -> facts dict, raising on a bad file) vets every
    save; a store opened with neither can list, load and delete but not save. One connection
    per thread: safe from any thread and any number of processes on the same file."""

    def __init__(self, path=None, base=None, check: Optional[Callable] = None, limits=Limits()):
        self.path = Path(path) if path is not None else default_path()
        self.limits = limits
        self._check = check or (loader_check(base) if base is not None else None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._init_schema()

    # ------------------------------------------------------------------ connections
    @contextmanager
    def _connect(self):
        """This thread's connection to the file (opened on first use, closed when the thread
        ends). Statements run in autocommit unless inside _write's transaction. Each statement
        is a hand-off of the GIL, so the hot paths use as few as they can: with thirty busy
        threads each hand-off can wait milliseconds."""
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                  check_same_thread=False)
            con.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process crash
            self._local.con = con
        try:
            yield con
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise

    @contextmanager
    def _write(self):
        """One write transaction, taken up front (BEGIN IMMEDIATE) so that checking a cap and
        inserting are atomic; rolled back on any error. Threads of this process queue on a lock
        first: SQLite's busy handler polls with sleeps of up to 100 ms, so thirty threads
        contending through it wait seconds, where a queue waits only for the writes ahead.
        Other processes still meet busy_timeout."""
        with _writer_lock(self.path), self._connect() as con:
            _retry(lambda: con.execute("BEGIN IMMEDIATE"))
            yield con  # _connect rolls back if the block raises
            _retry(lambda: con.execute("COMMIT"))

    def close(self):
        """Close this thread's connection (others close when their threads end)."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    def _init_schema(self):
        with _writer_lock(self.path), self._connect() as con:
            mode = _retry(lambda: _first(con.execute("PRAGMA journal_mode=WAL"))[0])
            if mode.lower() != "wal":
                raise StoreError(f"the store at {self.path} cannot use WAL mode (got {mode})")
            _retry(lambda: con.executescript(SCHEMA))

    # ------------------------------------------------------------------ phi
    def save_phi(self, owner, name, data: bytes, class_code=None, eval_exact=None, author="") -> PhiRecord:
        """Vet `data` and store it as phi `name` of bank token `owner` (in class `class_code`,
        if given). Refuses with StoreError (and changes nothing): a bad token, name, author or
        code, a closed class, a file that fails the loader checks or is over a cap, a name or a
        file already saved in the same place."""
        owner_h = _check_token(owner)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise StoreError("a phi name is 1-64 letters, digits, '_' or '-'")
        author = (author or "").strip()
        if author and not AUTHOR_RE.match(author):
            raise StoreError("a display name is 1-40 letters, digits, spaces, '.', \"'\" or '-'")
        code = _check_code(class_code) if class_code is not None else None
        if eval_exact is not None and not (isinstance(eval_exact, (int, float)) and 0 <= eval_exact <= 1):
            raise StoreError("eval_exact must be a fraction between 0 and 1")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StoreError("a phi file must be bytes")
        data = bytes(data)
        cap = min(self.limits.phi_bytes, MAX_FILE_BYTES)
        if len(data) > cap:
            raise StoreError(f"the file is {len(data):,} bytes, over the {cap:,}-byte limit for one phi")
        if self._check is None:
            raise StoreError("this store was opened without a base to check files against; it cannot save")
        try:
            facts = self._check(data)
        except AdapterLoadError as e:
            raise StoreError(f"not saved: {e}") from None
        if facts["method"] not in BANKABLE:
            raise StoreError(f"not saved: a {facts['method']} file is a whole model, not a phi that shares the base")
        task = str(facts.get("task") or "?")[:64]
        digest = hashlib.sha256(data).hexdigest()
        now = time.time()
        lim = self.limits
        args = dict(owner=owner_h, author=author, code=code, name=name, method=facts["method"], task=task,
                    config=json.dumps(facts["config"], sort_keys=True), num_params=int(facts["num_params"]),
                    size=len(data), eval_exact=None if eval_exact is None else float(eval_exact),
                    fp=facts["base_fingerprint"], sha=digest, now=now, data=sqlite3.Binary(data),
                    student_count=lim.student_count, student_bytes=lim.student_bytes, class_count=lim.class_count,
                    class_bytes=lim.class_bytes, total_bytes=lim.total_bytes)
        # One statement: it takes the write lock before it reads, so the checks and the insert
        # are atomic, and it hands the GIL off once (thirty busy threads make each hand-off slow).
        with _writer_lock(self.path), self._connect() as con:
            try:
                cur = _retry(lambda: con.execute(INSERT_IF_ALLOWED, args))
            except sqlite3.IntegrityError:  # another process won a race for the same name
                cur = None
            if cur is None or cur.rowcount != 1:
                self._check_place(con, owner_h, code, name, digest, len(data))  # says why
                raise StoreError("your bank or the class changed meanwhile; try again")
            phi_id = cur.lastrowid
        return PhiRecord(phi_id, owner_h, author, code, name, facts["method"], task, facts["config"],
                         int(facts["num_params"]), len(data), eval_exact, facts["base_fingerprint"], digest, now)

    def _check_place(self, con, owner_h, code, name, digest, size):
        """Why a save was refused, in one read (the same conditions as INSERT_IF_ALLOWED):
        the class is there and open, the name and the file are new to this place, no cap is
        exceeded. Raises StoreError with the first reason; returns if none holds any more."""
        row = con.execute(
            "SELECT (SELECT closed IS NULL FROM classes WHERE code=:code),"
            " (SELECT name FROM phi WHERE owner=:owner AND class_code IS :code AND (name=:name OR sha256=:sha)"
            "  LIMIT 1),"
            " (SELECT COUNT(*) FROM phi WHERE owner=:owner), (SELECT TOTAL(bytes) FROM phi WHERE owner=:owner),"
            " (SELECT COUNT(*) FROM phi WHERE class_code=:code), (SELECT TOTAL(bytes) FROM phi WHERE class_code=:code),"
            " (SELECT TOTAL(bytes) FROM phi)",
            dict(code=code, owner=owner_h, name=name, sha=digest)).fetchall()[0]
        is_open, same, n_own, b_own, n_class, b_class, total = row
        lim = self.limits
        if code is not None and is_open is None:
            raise StoreError("no class has that code")
        if code is not None and not is_open:
            raise StoreError("that class is closed: it takes no new phi")
        if same is not None:
            where = "this class" if code else "your bank"
            raise StoreError(f"{where} already holds a phi named {name!r}" if same == name else
                             f"this file is already in {where}, as {same!r}")
        if n_own + 1 > lim.student_count:
            raise StoreError(f"your bank holds {n_own} phi, the limit is {lim.student_count}: delete one first")
        if b_own + size > lim.student_bytes:
            raise StoreError(f"your phi would take {int(b_own) + size:,} bytes, over your {lim.student_bytes:,}-byte limit")
        if code is not None and n_class + 1 > lim.class_count:
            raise StoreError(f"the class holds {n_class} phi, its limit is {lim.class_count}")
        if code is not None and b_class + size > lim.class_bytes:
            raise StoreError(f"the class's phi would take {int(b_class) + size:,} bytes, "
                             f"over its {lim.class_bytes:,}-byte limit")
        if total + size > lim.total_bytes:
            raise StoreError("the store is full; ask whoever runs this server to make room")

    def list_phi(self, owner=None, class_code=None):
        """Records (no bytes), oldest first: a token's phi outside classes (`owner` alone), a
        class's phi (`class_code`), or a token's phi in one class (both)."""
        if owner is None and class_code is None:
            raise StoreError("list whose phi? give a bank token or a class code")
        where, args = [], []
        if owner is not None:
            where.append("owner=?")
            args.append(_check_token(owner))
        if class_code is not None:
            where.append("class_code=?")
            args.append(_check_code(class_code))
        elif owner is not None:
            where.append("class_code IS NULL")
        with self._connect() as con:
            rows = _retry(lambda: con.execute(f"SELECT {RECORD_COLUMNS} FROM phi WHERE {' AND '.join(where)} "
                                              "ORDER BY id", args).fetchall())
        return [_record(r) for r in rows]

    def get_phi(self, phi_id) -> PhiRecord:
        with self._connect() as con:
            row = _retry(lambda: _first(con.execute(f"SELECT {RECORD_COLUMNS} FROM phi WHERE id=?",
                                             (_check_id(phi_id),))))
        if row is None:
            raise StoreError(f"no phi with id {phi_id}")
        return _record(row)

    def load_bytes(self, phi_id) -> bytes:
        """The phi's file, checked against the sha256 taken when it was saved."""
        with self._connect() as con:
            row = _retry(lambda: _first(con.execute("SELECT data, sha256 FROM phi WHERE id=?",
                                             (_check_id(phi_id),))))
        if row is None:
            raise StoreError(f"no phi with id {phi_id}")
        data = bytes(row[0])
        if hashlib.sha256(data).hexdigest() != row[1]:
            raise StoreError(f"phi {phi_id} is damaged on disk (its bytes no longer match their checksum)")
        return data

    def delete_phi(self, phi_id, owner=None, teacher_key=None):
        """Delete one phi: its owner's bank token may, and so may the teacher key of its class.
        Anything else raises StoreError and deletes nothing."""
        phi_id = _check_id(phi_id)
        with self._write() as con:
            row = _first(con.execute("SELECT owner, class_code FROM phi WHERE id=?", (phi_id,)))
            if row is None:
                raise StoreError(f"no phi with id {phi_id}")
            if not self._may_delete(con, row, owner, teacher_key):
                raise StoreError("you may delete only your own phi (or, with the class's teacher key, any in the class)")
            con.execute("DELETE FROM phi WHERE id=?", (phi_id,))

    def _may_delete(self, con, row, owner, teacher_key):
        owner_h, code = row
        if owner is not None and valid_token(owner) and hmac.compare_digest(owner_h, _hash(owner)):
            return True
        if teacher_key is not None and code is not None and valid_token(teacher_key):
            want = _first(con.execute("SELECT teacher_key_hash FROM classes WHERE code=?", (code,)))
            return want is not None and hmac.compare_digest(want[0], _hash(teacher_key))
        return False

    def delete_owner(self, owner, class_code=None):
        """"Delete my phi": every phi of bank token `owner` (only those in `class_code` if
        given). Returns how many were deleted."""
        owner_h = _check_token(owner)
        with self._write() as con:
            if class_code is None:
                cur = con.execute("DELETE FROM phi WHERE owner=?", (owner_h,))
            else:
                cur = con.execute("DELETE FROM phi WHERE owner=? AND class_code=?", (owner_h, _check_code(class_code)))
            return cur.rowcount

    # ------------------------------------------------------------------ classes
    def create_class(self, name):
        """(join code, teacher key) of a new class. Show the key once: only its hash is kept."""
        name = (name or "").strip()
        if not AUTHOR_RE.match(name):
            raise StoreError("a class name is 1-40 letters, digits, spaces, '.', \"'\" or '-'")
        key = secrets.token_urlsafe(24)
        with self._write() as con:
            if _first(con.execute("SELECT COUNT(*) FROM classes"))[0] >= self.limits.classes:
                raise StoreError("this server holds as many classes as it may; ask whoever runs it")
            for _ in range(20):  # a collision is ~1e-9 per existing class; retry anyway
                code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LEN))
                if _first(con.execute("SELECT 1 FROM classes WHERE code=?", (code,))) is None:
                    break
            else:
                raise StoreError("could not draw a free class code; try again")
            con.execute("INSERT INTO classes (code, name, teacher_key_hash, created, closed) VALUES (?,?,?,?,NULL)",
                        (code, name, _hash(key), time.time()))
        return code, key

    def class_info(self, code) -> ClassInfo:
        """The class with join code `code`; StoreError if malformed or unknown."""
        code = _check_code(code)
        with self._connect() as con:
            row = _retry(lambda: _first(con.execute(
                "SELECT c.code, c.name, c.created, c.closed, COUNT(p.id), COALESCE(SUM(p.bytes), 0) "
                "FROM classes c LEFT JOIN phi p ON p.class_code = c.code WHERE c.code=? GROUP BY c.code",
                (code,))))
        if row is None:
            raise StoreError("no class has that code: check it with your teacher")
        return ClassInfo(*row)

    def join(self, code) -> ClassInfo:
        """class_info for a student joining: the class must be open."""
        info = self.class_info(code)
        if not info.is_open:
            raise StoreError(f"class {info.name!r} is closed")
        return info

    def is_teacher(self, code, teacher_key):
        code = _check_code(code)
        if not valid_token(teacher_key):
            return False
        with self._connect() as con:
            row = _retry(lambda: _first(con.execute("SELECT teacher_key_hash FROM classes WHERE code=?", (code,))))
        return row is not None and hmac.compare_digest(row[0], _hash(teacher_key))

    def close_class(self, code, teacher_key):
        """Close the class (its board stays readable; it takes no new phi). Teacher key only."""
        code = _check_code(code)
        with self._write() as con:
            row = _first(con.execute("SELECT teacher_key_hash FROM classes WHERE code=?", (code,)))
            if row is None:
                raise StoreError("no class has that code")
            if not (valid_token(teacher_key) and hmac.compare_digest(row[0], _hash(teacher_key))):
                raise StoreError("that is not this class's teacher key")
            con.execute("UPDATE classes SET closed=? WHERE code=? AND closed IS NULL", (time.time(), code))

    # ------------------------------------------------------------------ facts
    def stats(self):
        """{'phi', 'phi_bytes', 'classes', 'file_bytes'}: what the store holds and its size on disk
        (the database plus its write-ahead log)."""
        with self._connect() as con:
            n, b = _first(con.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM phi"))
            classes = _first(con.execute("SELECT COUNT(*) FROM classes"))[0]
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return dict(phi=n, phi_bytes=b, classes=classes, file_bytes=size)

    def checkpoint(self):
        """Fold the write-ahead log into the database file (SQLite also does this by itself)."""
        with self._connect() as con:
            _retry(lambda: _first(con.execute("PRAGMA wal_checkpoint(TRUNCATE)")))


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
CREATE TABLE IF NOT EXISTS classes (
    code TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    teacher_key_hash TEXT NOT NULL,
    created REAL NOT NULL,
    closed REAL
);
CREATE TABLE IF NOT EXISTS phi (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,                -- sha256 of the bank token
    author TEXT NOT NULL DEFAULT '',    -- display name on a class board
    class_code TEXT REFERENCES classes(code),
    name TEXT NOT NULL,
    method TEXT NOT NULL,
    task TEXT NOT NULL,
    config TEXT NOT NULL,               -- JSON
    num_params INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    eval_exact REAL,
    base_fingerprint TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    data BLOB NOT NULL                  -- the .safetensors file
);
CREATE UNIQUE INDEX IF NOT EXISTS phi_place_name ON phi (owner, COALESCE(class_code, ''), name);
-- covering indexes: the caps sum bytes without reading a row (a row is a page of blob)
CREATE INDEX IF NOT EXISTS phi_owner ON phi (owner, class_code, bytes, sha256);
CREATE INDEX IF NOT EXISTS phi_class ON phi (class_code, bytes);
CREATE INDEX IF NOT EXISTS phi_bytes ON phi (bytes);
"""
INSERT_IF_ALLOWED = """
INSERT INTO phi (owner, author, class_code, name, method, task, config, num_params, bytes, eval_exact,
                 base_fingerprint, sha256, created, data)
SELECT :owner, :author, :code, :name, :method, :task, :config, :num_params, :size, :eval_exact, :fp, :sha, :now, :data
WHERE (:code IS NULL OR EXISTS (SELECT 1 FROM classes WHERE code = :code AND closed IS NULL))
  AND NOT EXISTS (SELECT 1 FROM phi WHERE owner = :owner AND class_code IS :code AND (name = :name OR sha256 = :sha))
  AND (SELECT COUNT(*) FROM phi WHERE owner = :owner) < :student_count
  AND (SELECT TOTAL(bytes) FROM phi WHERE owner = :owner) + :size <= :student_bytes
  AND (:code IS NULL OR ((SELECT COUNT(*) FROM phi WHERE class_code = :code) < :class_count
                         AND (SELECT TOTAL(bytes) FROM phi WHERE class_code = :code) + :size <= :class_bytes))
  AND (SELECT TOTAL(bytes) FROM phi) + :size <= :total_bytes
"""
RECORD_COLUMNS = ("id, owner, author, class_code, name, method, task, config, num_params, bytes, eval_exact, "
                  "base_fingerprint, sha256, created")


def _first(cursor):
    """The first row or None, the statement run to its end (so no read stays open)."""
    rows = cursor.fetchall()
    return rows[0] if rows else None


_WRITER_LOCKS, _WRITER_LOCKS_GUARD = {}, threading.Lock()


def _writer_lock(path):
    key = os.path.realpath(path)
    with _WRITER_LOCKS_GUARD:
        return _WRITER_LOCKS.setdefault(key, threading.Lock())


def _record(row):
    row = list(row)
    row[7] = json.loads(row[7])
    return PhiRecord(*row)


def _check_id(phi_id):
    if isinstance(phi_id, bool) or not isinstance(phi_id, int) or phi_id < 1:
        try:
            phi_id = int(str(phi_id))
        except ValueError:
            raise StoreError("a phi id is a positive whole number") from None
        if phi_id < 1:
            raise StoreError("a phi id is a positive whole number")
    return phi_id


def _retry(fn, attempts=6):
    """Run a statement again if SQLite still reports the database busy after busy_timeout
    (it can skip the busy handler, e.g. while another connection recovers the WAL)."""
    for i in range(attempts):
        try:
            return fn()
        except sqlite3.OperationalError as e:
            msg = str(e)
            busy = "locked" in msg or "busy" in msg
            if not busy:
                raise StoreError(f"the store failed: {msg}") from None
            if i == attempts - 1:
                raise StoreError("the store is busy; try again in a moment") from None
            time.sleep(0.05 * 2 ** i)
