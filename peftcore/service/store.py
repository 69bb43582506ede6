"""The store: saved phi and classes in one SQLite file, so a phi outlives the browser tab.

Never imports streamlit. Standard library `sqlite3` in WAL mode: readers never wait for the
writer, and every write is one transaction, so a process killed in the middle of a save
leaves the save either whole or absent. A file's bytes are kept once (a blob keyed by its
sha256) however many rows name it. Every failure is a StoreError with a message fit for a
visitor: busy (another process writes; we wait at most `wait_s`), full, read-only (then the
store opens read-only and can still be read, on a read-only disk too), damaged; never a raw
sqlite3 error or a path.

Who may do what rests on secrets the store mints and verifies:
- a *server key* (meta row 'token_key', made with the file) signs every token, so a value a
  client made up or planted is refused (`token_ok`); a read-only file without one signs with
  a key of this process only;
- a student's *bank token* (`mint_token("bank")`: 22 random characters and their signature)
  owns the phi saved with it; the store keeps only its sha256, so the file on disk cannot be
  used to delete anything. An unsigned 22-character token made before signing still counts
  as a bank if it owns a phi. An *owner id* (`mint_token("owner")`) names whose runs are whose;
- a class has a short *join code* (shared with the room: it lets students see the board and
  save into the class) and a separate *teacher key* (shown once; kept as a sha256) that
  deletes any phi in the class and closes it. A browser keeps a *teacher handle* instead of
  the key (`teacher_handle`): signed, it names the class and expires, and closing the class
  ends it (`teacher_of`).
Tokens, codes, keys and handles never appear in an exception message or a log line.

Every file passes peftcore's loader checks before it enters the store (format, config, base
fingerprint, tensor names, shapes, values: `serialization.load_adapter` on a scratch model
over the base), and caps bound what one student, one class, one client address and the
whole store may hold. Names are plain text (`clean_name`); wrong join codes are rate-limited
per client address.

    store = Store(default_path(), base=peftcore.load_base())
    token = store.mint_token("bank")                       # store.token_ok(token, "bank") -> True
    code, key = store.create_class("Monday group")
    handle = store.teacher_handle(code, key)               # store.teacher_of(handle) -> code
    store.join(code, client=address)
    rec = store.save_phi(token, "lora-times_3", data, class_code=code, author="Ada", client=address)
    store.list_phi(class_code=code); store.load_bytes(rec.id); store.delete_phi(rec.id, owner=token)
    store.usage(code)  # {'phi', 'bytes', 'students', 'phi_limit', 'bytes_limit'}
"""
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
import unicodedata
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import quote

from ..methods import registry
from ..serialization import MAX_FILE_BYTES, AdapterLoadError, adapter_config, load_adapter, task_label

ENV_VAR = "PEFT_STORE"
SCHEMA_VERSION = 2                                         # 2: file bytes in `blobs`, rows name them
WAIT_S = 3.0                                               # the longest a call waits on another process
RESERVE_BYTES = 2 * 2**20                                  # disk kept back so that deletes work when full
WAL_PAGES = 256                                            # fold the log in past 1 MB: less for a delete to need
NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")              # the bank's adapter names (use fullmatch)
AUTHOR_RE = re.compile(r"[\w .'\-]{1,40}")                 # a student's display name
TOKEN_RE = re.compile(r"[A-Za-z0-9_\-]{22,64}")            # secrets.token_urlsafe(16) and longer
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"          # no 0/O, 1/I/L: read off a projector
CODE_LEN = 6                                               # 31**6 ~ 8.9e8 codes
CODE_RE = re.compile(f"[{CODE_ALPHABET}]{{{CODE_LEN}}}")
TOKEN_KINDS = ("bank", "owner")                            # what mint_token signs
SIG_LEN = 22                                               # 16 bytes of HMAC-SHA256, URL-safe base64
TEACHER_TTL_S = 8 * 3600                                   # a teacher handle lasts a school day
# a teacher handle: class code, expiry (unix seconds in base 36), 12 random characters, signature
HANDLE_RE = re.compile(f"([{CODE_ALPHABET}]{{{CODE_LEN}}})([0-9a-z]{{1,12}})[A-Za-z0-9_\\-]{{{12 + SIG_LEN}}}")
MAX_ID = 2**63 - 1                                         # SQLite's largest integer: beyond, it cannot bind one
ID_RE = re.compile(r"[0-9]{1,19}")

BUSY = "the store is busy (another process is writing to it); try again in a moment"
FULL = "the store is full; ask whoever runs this server to make room (deleting phi still works)"
READ_ONLY = "the store is read-only: saved phi can be listed and loaded, but nothing can be saved or deleted"
DAMAGED = "the store's file is damaged (it is not a readable database); ask whoever runs this server"
CANNOT_OPEN = "the store's file cannot be opened or created; ask whoever runs this server"
DISK = "the store's disk could not be read or written (an I/O error); ask whoever runs this server"
FAILED = "the store failed; try again, or ask whoever runs this server"
STRANDED = ("the store is on a read-only disk, and its last saves are still in its log beside it, which "
            "cannot be read there; ask whoever runs this server to open it once with write access")
BAD_ID = "a phi id is a positive whole number below 2^63"
NOT_TEACHER = "that is not this class's teacher key"


class StoreError(ValueError):
    """Why the store refused: the message is safe to show a user (it never holds a secret or
    a server path). `reason` is 'busy', 'full', 'read-only', 'damaged', 'cannot-open',
    'failed' for faults of the store itself, None for a refused request."""

    def __init__(self, message, reason=None):
        super().__init__(message or FAILED)  # never an empty message
        self.reason = reason


# sqlite3 result codes (their names, e.g. SQLITE_BUSY_SNAPSHOT, start with these) -> what to say
_FAULTS = {"SQLITE_BUSY": ("busy", BUSY), "SQLITE_LOCKED": ("busy", BUSY), "SQLITE_FULL": ("full", FULL),
           "SQLITE_READONLY": ("read-only", READ_ONLY), "SQLITE_CORRUPT": ("damaged", DAMAGED),
           "SQLITE_NOTADB": ("damaged", DAMAGED), "SQLITE_CANTOPEN": ("cannot-open", CANNOT_OPEN),
           "SQLITE_PERM": ("cannot-open", CANNOT_OPEN), "SQLITE_AUTH": ("cannot-open", CANNOT_OPEN),
           "SQLITE_IOERR": ("failed", DISK)}


def _fault(e):
    """The StoreError for a sqlite3 or OS error. The raw message (and SQLite's own name for
    the error) is not shown: it can name a path, and it means nothing to a visitor."""
    if isinstance(e, OSError):
        return StoreError(CANNOT_OPEN, "cannot-open")
    name = getattr(e, "sqlite_errorname", None) or ""
    for prefix, (reason, message) in _FAULTS.items():
        if name.startswith(prefix):
            return StoreError(message, reason)
    return StoreError(FAILED, "failed")


def _busy(e):
    return isinstance(e, sqlite3.OperationalError) and _fault(e).reason == "busy"


@dataclass(frozen=True)
class Limits:
    """Caps on what one student (bank token), one class, one client address and the whole
    store may hold. Bytes count distinct files: a row naming a file already counted adds 0."""
    phi_bytes: int = 2 * 2**20            # one phi file; LoRA here is ~32 KB, an adapter ~140 KB
    student_count: int = 50               # phi per bank token, personal and class together
    student_bytes: int = 16 * 2**20
    class_count: int = 120                # phi in one class (the mixed batch serves them all)
    class_bytes: int = 64 * 2**20
    client_count: int = 300               # phi saved from one address: tokens are free to mint,
    client_bytes: int = 128 * 2**20       # but a room behind one NAT shares an address
    total_bytes: int = 2 * 2**30          # the whole store
    classes: int = 10_000
    join_failures: int = 10               # wrong join codes per client address ...
    join_window_s: float = 60.0           # ... within this sliding window


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
    bytes: int                            # distinct files: one file saved by five students counts once
    students: int = 0                     # distinct bank tokens with a phi in the class

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
    """128 random bits, URL-safe (22 characters): unsigned, as bank tokens were before signing.
    A server mints with Store.mint_token, which it can verify."""
    return secrets.token_urlsafe(16)


def valid_token(token):
    return isinstance(token, str) and TOKEN_RE.fullmatch(token) is not None  # fullmatch: "$" passes "x\n"


def normalize_code(code):
    """A join code as typed ('abc-def ', 'ABCDEF') -> 'ABCDEF', or None if it cannot be one."""
    if not isinstance(code, str):
        return None
    c = re.sub(r"[\s\-]", "", code).upper()
    return c if CODE_RE.fullmatch(c) else None


NAME_CHARS = {  # what each kind of name may hold, and how to say it
    "display": (re.compile(r"[\w .'\-]"), "letters, digits, spaces, '.', \"'\", '_' and '-'"),
    "id": (re.compile(r"[A-Za-z0-9_\-]"), "letters a-z, digits, '_' and '-'"),
}


def clean_name(text, what="display name", max_len=40, chars="display"):
    """`text` as a plain-text name, or StoreError saying what is wrong with it. NFKC first, so
    a full-width or ligature look-alike is stored as what it reads as; then no control or
    invisible format characters (a trailing new line included), trimmed, 1 to `max_len`
    characters, only NAME_CHARS[chars]. The UI can call it to check a name before saving."""
    if not isinstance(text, str):
        raise StoreError(f"a {what} must be text")
    t = unicodedata.normalize("NFKC", text)
    if any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in t):
        raise StoreError(f"a {what} cannot hold control characters (a new line, a tab, an invisible mark)")
    t = t.strip()
    if not t:
        raise StoreError(f"a {what} cannot be empty")
    if len(t) > max_len:
        raise StoreError(f"a {what} is at most {max_len} characters; this one has {len(t)}: shorten it")
    allowed, say = NAME_CHARS[chars]
    bad = sorted({c for c in t if not allowed.fullmatch(c)})
    if bad:
        raise StoreError(f"a {what} may hold only {say}, not {', '.join(map(repr, bad[:5]))}")
    return t


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
    from ..peft_model import PeftModel

    def check(data):
        model = PeftModel(base)  # a view: shares the base's tensors, copies none
        load_adapter(model, "probe", data)
        cfg = adapter_config(model, "probe")
        record = cfg.pop("peftcore")
        return dict(method=record["method"], task=task_label(record.get("task"), record.get("merged_from")), config=cfg,
                    num_params=model.adapter_num_params("probe"), base_fingerprint=model.base_fingerprint)
    return check


class Store:
    """Saved phi and classes in the SQLite file at `path` (created on first use).

    `base` (the frozen base) or `check` (data -> facts dict, raising on a bad file) vets every
    save; a store opened with neither can list, load and delete but not save. One connection
    per thread: safe from any thread and any number of processes on the same file. A file
    this process may not write (or `read_only=True`), on a read-only disk too, is opened
    read-only: it lists and loads, and signs tokens with its key (or this process's).
    `wait_s` bounds every wait on another process's write lock; `reserve_bytes` is the disk
    kept back beside the file (`<path>-reserve`) for deletes on a full disk."""

    def __init__(self, path=None, base=None, check: Optional[Callable] = None, limits=Limits(),
                 read_only=None, wait_s=WAIT_S, reserve_bytes=RESERVE_BYTES):
        self.path = Path(path) if path is not None else default_path()
        self.limits, self.wait_s, self.reserve_bytes = limits, wait_s, reserve_bytes
        self._reserve = Path(f"{self.path}-reserve")
        self._check = check or (loader_check(base) if base is not None else None)
        self._local = threading.local()
        self._failures, self._failures_lock = {}, threading.Lock()  # client -> times of wrong join codes
        self._ro_uri = None  # how a read-only connection opens the file (set by _init_schema)
        try:
            exists = self.path.exists()  # inside the try: a folder we may not search raises
            # as root, os.access says yes to a 0444 file: then writing works, and so does this
            self.read_only = bool(read_only) or (read_only is None and exists and not (
                os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)))
            if not self.read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._init_schema()
        except StoreError as e:
            if self.read_only or not exists or e.reason not in ("read-only", "cannot-open", "failed"):
                raise
            self.close()  # a read-only file system that says it is writable: read what is there
            self.read_only = True
            self._init_schema()
        except OSError as e:
            raise _fault(e) from None

    # ------------------------------------------------------------------ connections
    def _open(self):
        if not self.read_only:
            con = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process crash
            con.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            # Debian's SQLite zeroes every freed page (SECURE_DELETE): a delete then logs as many
            # bytes as it frees and fails on a full disk. A phi is no secret: FAST zeroes only for free.
            con.execute("PRAGMA secure_delete=FAST")
            return con
        return sqlite3.connect(self._ro_uri or _ro_uri(self.path), uri=True, timeout=0, isolation_level=None,
                               check_same_thread=False)

    @contextmanager
    def _connect(self):
        """This thread's connection to the file (opened on first use, closed when the thread
        ends). Statements run in autocommit unless inside _write's transaction. Any sqlite3
        error leaves as a StoreError. busy_timeout is 0: the waiting is ours (_read, _write),
        bounded by wait_s and never inside the in-process writer lock."""
        try:
            con = getattr(self._local, "con", None)
            if con is None:
                con = self._local.con = self._open()
            try:
                yield con
            finally:
                if con.in_transaction:  # the block raised: nothing of it stays
                    con.execute("ROLLBACK")
        except (sqlite3.Error, OSError) as e:
            raise _fault(e) from None

    def _read(self, fn):
        """fn(con), tried again while the file is busy (another connection recovering the
        WAL, say), for at most wait_s."""
        with self._connect() as con:
            for _ in _waits(self.wait_s):
                try:
                    return fn(con)
                except sqlite3.OperationalError as e:
                    if not _busy(e):
                        raise
        raise StoreError(BUSY, "busy")

    @contextmanager
    def _write(self):
        """One write transaction, taken up front (BEGIN IMMEDIATE) so that checking a cap and
        inserting are atomic; rolled back on any error. Threads of this process queue on a lock
        (a queue waits only for the writes ahead; SQLite's busy handler polls with sleeps). The
        lock is held only while this thread holds SQLite's write lock or tries for it at once:
        while another process writes, we let go of it, sleep and try again, for at most wait_s,
        so an unrelated write of this process never waits behind our retries."""
        if self.read_only:
            raise StoreError(READ_ONLY, "read-only")
        lock = _writer_lock(self.path)
        deadline = time.monotonic() + self.wait_s
        with self._connect() as con:
            for _ in _waits(self.wait_s):
                if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    break
                try:
                    con.execute("BEGIN IMMEDIATE")  # busy_timeout 0: fails at once if another process writes
                    break
                except BaseException as e:
                    lock.release()
                    if not _busy(e):
                        raise
            else:
                raise StoreError(BUSY, "busy")
            if not con.in_transaction:  # the lock's wait ran out
                raise StoreError(BUSY, "busy")
            try:
                yield con
                con.execute("COMMIT")
            finally:
                try:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                finally:
                    lock.release()

    def close(self):
        """Close this thread's connection (others close when their threads end)."""
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    def _init_schema(self):
        if self.read_only:
            self._open_read_only()
        else:
            self._version = self._read(_schema_version)
            if self._version != SCHEMA_VERSION:
                self._migrate()
        if self._version is None:
            raise StoreError("the store's file holds no store (it is empty, or it was copied without "
                             "its log); ask whoever runs this server", "damaged")
        if self._version not in (1, SCHEMA_VERSION):
            raise StoreError("the store's file was written by another version of this app "
                             f"(schema {self._version}); ask whoever runs this server", "failed")
        self._token_key = self._load_token_key()

    def _open_read_only(self):
        """Read the file as it is: mode=ro shares the -shm of a WAL file; where that cannot be
        made (a read-only disk or folder), immutable=1 reads the file alone, and if a log with
        saves in it lies beside the file, a private copy of both is read, so nothing committed
        is missed."""
        self._ro_uri = _ro_uri(self.path)
        try:
            self._version = self._read(_schema_version)
            return
        except StoreError as e:
            if e.reason not in ("cannot-open", "read-only", "failed"):
                raise
        self.close()
        wal = Path(f"{self.path}-wal")
        self._ro_uri = _ro_uri(self._copy_with_log(wal)) if _size(wal) else _ro_uri(self.path, immutable=True)
        self._version = self._read(_schema_version)

    def _copy_with_log(self, wal):
        """A private copy of the file and its log in a temporary folder (removed with the Store)."""
        folder = tempfile.mkdtemp(prefix="peft-store-copy-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        try:
            copy = Path(folder) / "store.sqlite3"
            shutil.copyfile(self.path, copy)
            shutil.copyfile(wal, f"{copy}-wal")
        except OSError:
            raise StoreError(STRANDED, "read-only") from None
        return copy

    def _load_token_key(self):
        """The key tokens are signed with: meta 'token_key', written at open where a writable
        file lacks it; a read-only file without one signs with this process's key."""
        def read(con):
            return _first(con.execute("SELECT value FROM meta WHERE key='token_key'"))
        row = self._read(read)
        if row is None and not self.read_only:
            with self._write() as con:
                con.execute("INSERT OR IGNORE INTO meta VALUES ('token_key', ?)", (secrets.token_hex(32),))
                row = read(con)
        return str(row[0]).encode() if row else _PROCESS_KEY

    def _migrate(self):
        """Create the tables in a new file, or bring a schema-1 file (bytes in each row) to
        schema 2 (bytes once per file, in `blobs`) in one transaction: all or nothing."""
        if self._read(lambda con: _first(con.execute("PRAGMA journal_mode=WAL"))[0]).lower() != "wal":
            raise StoreError("the store cannot use SQLite's WAL mode", "failed")
        with self._write() as con:
            version = _schema_version(con)  # again, under the lock: another process may have done it
            if version is None:
                for statement in CREATE:
                    con.execute(statement)
            elif version == 1:
                for statement in MIGRATE_1_TO_2:  # DROP COLUMN: SQLite 3.35 and later
                    con.execute(statement)
            elif version != SCHEMA_VERSION:
                self._version = version
                return
            for statement in INDEXES:
                con.execute(statement)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('client_key', ?)", (secrets.token_hex(32),))
            con.execute("INSERT OR IGNORE INTO meta VALUES ('token_key', ?)", (secrets.token_hex(32),))
        self._version = SCHEMA_VERSION

    def _client_hash(self, client):
        """A keyed hash of a client address: the file alone does not give the addresses back
        (there are only 2**32 IPv4 addresses to try against a plain sha256)."""
        if getattr(self, "_client_key", None) is None:
            row = self._read(lambda con: _first(con.execute("SELECT value FROM meta WHERE key='client_key'")))
            if row is None:
                raise StoreError("this store has no client key; open it with write access once", "failed")
            self._client_key = row[0].encode()
        return hmac.new(self._client_key, str(client).encode(), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------ tokens the server signs
    def _sign(self, kind, payload):
        """22 URL-safe characters: the first 16 bytes of HMAC-SHA256(server key, kind:payload)."""
        mac = hmac.new(self._token_key, f"{kind}:{payload}".encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def mint_token(self, kind):
        """A new token of `kind` ("bank" or "owner"): 22 random characters and their signature
        (44 characters, TOKEN_RE). Only this store's key makes one that token_ok accepts."""
        if kind not in TOKEN_KINDS:
            raise StoreError(f"a token is of kind {' or '.join(TOKEN_KINDS)}")
        payload = secrets.token_urlsafe(16)
        return payload + self._sign(kind, payload)

    def token_ok(self, token, kind):
        """Whether `token` is a token of `kind` this store signed. For "bank", an unsigned
        22-character token made before signing also counts if it owns a phi here. Anything
        malformed is False; a fault of the store raises StoreError (a bank is not refused for it)."""
        if not valid_token(token) or kind not in TOKEN_KINDS:
            return False
        if len(token) == 22 + SIG_LEN:
            return hmac.compare_digest(token[22:], self._sign(kind, token[:22]))
        if len(token) == 22 and kind == "bank":
            return self._read(lambda con: _first(con.execute(
                "SELECT 1 FROM phi WHERE owner=? LIMIT 1", (_hash(token),)))) is not None
        return False

    def teacher_handle(self, code, teacher_key, ttl_s=TEACHER_TTL_S):
        """What a browser keeps in teacher mode instead of the key: the class code, an expiry
        `ttl_s` from now and 12 random characters, signed (at most 52 characters of TOKEN_RE's
        alphabet). StoreError unless `teacher_key` is the class's key."""
        code = _check_code(code)
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 < ttl_s <= 31 * 86400:
            raise StoreError("a teacher handle lasts more than 0 seconds and at most 31 days")
        if not self.is_teacher(code, teacher_key):
            raise StoreError(NOT_TEACHER)
        if not self._read(lambda con: _class_open(con, code)):
            raise StoreError("that class is closed: its teacher mode has ended")
        expires = _base36(int(time.time() + ttl_s))
        body = code + expires + secrets.token_urlsafe(9)  # 9 bytes: 12 characters
        return body + self._sign("teacher", body)

    def _handle_code(self, handle):
        """The class code a well-formed, signed, unexpired handle names; else None (no lookup)."""
        m = HANDLE_RE.fullmatch(handle) if isinstance(handle, str) else None
        if m is None or not hmac.compare_digest(handle[-SIG_LEN:], self._sign("teacher", handle[:-SIG_LEN])):
            return None
        return m[1] if time.time() < int(m[2], 36) else None

    def teacher_of(self, handle) -> Optional[str]:
        """The class code of a teacher handle while it is valid: signed here, not expired, and
        its class still open (closing a class ends every handle); else None."""
        code = self._handle_code(handle)
        return code if code is not None and self._read(lambda con: _class_open(con, code)) else None

    # ------------------------------------------------------------------ phi
    def save_phi(self, owner, name, data: bytes, class_code=None, eval_exact=None, author="",
                 client=None) -> PhiRecord:
        """Vet `data` and store it as phi `name` of bank token `owner` (in class `class_code`,
        if given; saved from address `client`, if given, kept as a keyed hash). Refuses with
        StoreError (and changes nothing): a bad token, name, author or code, a closed class, a
        file that fails the loader checks or is over a cap, a name or a file already saved in
        the same place, a busy, full or read-only store."""
        owner_h = _check_token(owner)
        name = clean_name(name, "phi name", 64, chars="id")
        author = "" if author is None or (isinstance(author, str) and not author.strip()) \
            else clean_name(author, "display name", 40)
        code = _check_code(class_code) if class_code is not None else None
        if isinstance(eval_exact, bool) or eval_exact is not None and not (
                isinstance(eval_exact, (int, float)) and 0 <= eval_exact <= 1):
            raise StoreError("eval_exact must be a fraction between 0 and 1")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StoreError("a phi file must be bytes")
        data = bytes(data)
        cap = min(self.limits.phi_bytes, MAX_FILE_BYTES)
        if len(data) > cap:
            raise StoreError(f"the file is {len(data):,} bytes, over the {cap:,}-byte limit for one phi")
        if self.read_only:
            raise StoreError(READ_ONLY, "read-only")
        client_h = None if client is None else self._client_hash(client)
        if self._check is None:
            raise StoreError("this store was opened without a base to check files against; it cannot save")
        try:
            facts = self._check(data)
        except AdapterLoadError as e:
            raise StoreError(f"not saved: {e}") from None
        if facts["method"] not in registry.bankable():
            raise StoreError(f"not saved: a {facts['method']} file is a whole model, not a phi that shares the base")
        task = str(facts.get("task") or "?")[:64]
        digest = hashlib.sha256(data).hexdigest()
        now = time.time()
        args = dict(owner=owner_h, author=author, code=code, client=client_h, name=name, method=facts["method"],
                    task=task, config=json.dumps(facts["config"], sort_keys=True),
                    num_params=int(facts["num_params"]), size=len(data),
                    eval_exact=None if eval_exact is None else float(eval_exact), fp=facts["base_fingerprint"],
                    sha=digest, now=now)
        with self._write() as con:  # the checks and the insert in one transaction: atomic
            self._check_place(con, args)
            phi_id = con.execute(INSERT_PHI, args).lastrowid
            con.execute("INSERT OR IGNORE INTO blobs (sha256, bytes, data) VALUES (?, ?, ?)",
                        (digest, len(data), sqlite3.Binary(data)))
        self._keep_reserve()
        return PhiRecord(phi_id, owner_h, author, code, name, facts["method"], task, facts["config"],
                         int(facts["num_params"]), len(data), eval_exact, facts["base_fingerprint"], digest, now)

    def _check_place(self, con, a):
        """Raise StoreError with the first reason this save may not go in, in one read: the
        class is there and open, the name and the file are new to this place, and no cap of
        bank, class, client or store would be exceeded by what the row adds (a file already
        counted in a scope adds no bytes to it)."""
        row = con.execute(PLACE_SQL, a).fetchall()[0]
        is_open, same, *scopes, total, stored = row
        (n_own, b_own, has_own), (n_class, b_class, has_class), (n_client, b_client, has_client) = \
            (scopes[i:i + 3] for i in range(0, 9, 3))
        lim, code, size, name = self.limits, a["code"], a["size"], a["name"]
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
        if b_own + (0 if has_own else size) > lim.student_bytes:
            raise StoreError(f"your phi would take {int(b_own) + size:,} bytes, over your {lim.student_bytes:,}-byte limit")
        if code is not None and n_class + 1 > lim.class_count:
            raise StoreError(f"the class holds {n_class} phi, its limit is {lim.class_count}")
        if code is not None and b_class + (0 if has_class else size) > lim.class_bytes:
            raise StoreError(f"the class's phi would take {int(b_class) + size:,} bytes, "
                             f"over its {lim.class_bytes:,}-byte limit")
        if a["client"] is not None and n_client + 1 > lim.client_count:
            raise StoreError(f"{n_client} phi were saved from your address, the limit is {lim.client_count}")
        if a["client"] is not None and b_client + (0 if has_client else size) > lim.client_bytes:
            raise StoreError(f"phi saved from your address would take {int(b_client) + size:,} bytes, "
                             f"over its {lim.client_bytes:,}-byte limit")
        if total + (0 if stored else size) > lim.total_bytes:
            raise StoreError(FULL, "full")

    def list_phi(self, owner=None, class_code=None):
        """Records (no bytes), oldest first: a token's phi outside classes (`owner` alone), a
        class's phi (`class_code`), or a token's phi in one class (both). A row whose fields
        do not parse is listed as best it can be (its load then fails), so it can be deleted."""
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
        rows = self._read(lambda con: con.execute(f"SELECT {RECORD_COLUMNS} FROM phi WHERE {' AND '.join(where)} "
                                                  "ORDER BY id", args).fetchall())
        return [_record(r) for r in rows]

    def get_phi(self, phi_id) -> PhiRecord:
        phi_id = _check_id(phi_id)
        row = self._read(lambda con: _first(con.execute(f"SELECT {RECORD_COLUMNS} FROM phi WHERE id=?", (phi_id,))))
        if row is None:
            raise StoreError(f"no phi with id {phi_id}")
        return _record(row)

    def load_bytes(self, phi_id) -> bytes:
        """The phi's file, checked against the sha256 taken when it was saved."""
        phi_id = _check_id(phi_id)
        sql = ("SELECT data, sha256 FROM phi WHERE id=?" if self._version == 1 else
               "SELECT b.data, p.sha256 FROM phi p LEFT JOIN blobs b ON b.sha256 = p.sha256 WHERE p.id=?")
        row = self._read(lambda con: _first(con.execute(sql, (phi_id,))))
        if row is None:
            raise StoreError(f"no phi with id {phi_id}")
        data = row[0]
        if not isinstance(data, (bytes, memoryview)) or hashlib.sha256(data).hexdigest() != row[1]:
            raise StoreError(f"phi {phi_id} is damaged in the store (its bytes are missing or no longer "
                             "match their checksum); delete it", "damaged")
        return bytes(data)

    def delete_phi(self, phi_id, owner=None, teacher_key=None, teacher_handle=None):
        """Delete one phi: its owner's bank token may, and so may the teacher key of its class
        or a valid teacher handle for it. Anything else raises StoreError and deletes nothing.
        Works on a full store."""
        phi_id = _check_id(phi_id)

        def delete(con):
            row = _first(con.execute("SELECT owner, class_code FROM phi WHERE id=?", (phi_id,)))
            if row is None:
                raise StoreError(f"no phi with id {phi_id}")
            if not self._may_delete(con, row, owner, teacher_key, teacher_handle):
                raise StoreError("you may delete only your own phi (or, with the class's teacher key, any in the class)")
            con.execute("DELETE FROM phi WHERE id=?", (phi_id,))  # the trigger drops a blob no row names
        self._delete(delete)

    def _delete(self, fn):
        """A delete; on a full disk, tried again after giving the reserve back and folding the
        write-ahead log into the file (a delete writes log frames, and the saves that filled the
        disk may still be in the log: both need new space, which the reserve is for)."""
        try:
            with self._write() as con:
                return fn(con)
        except StoreError as e:
            if e.reason != "full":
                raise
        self._reserve.unlink(missing_ok=True)
        try:
            self.checkpoint()
        except StoreError:
            pass  # the delete may fit without it
        with self._write() as con:
            n = fn(con)
        try:  # fold the delete in too and let the next write reuse the log's file from its start
            self.checkpoint("RESTART")
        except StoreError:
            pass
        return n

    def _keep_reserve(self):
        """Hold back min(reserve_bytes, the store's size) of disk in `<path>-reserve`, random
        bytes (zeros can be sparse or compressed): enough to fold the log in and delete, and no
        more than a small store needs. Best effort: a full disk refuses saves anyway."""
        if self.read_only or not self.reserve_bytes:
            return
        try:
            want = min(self.reserve_bytes, sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal"))
                                               if p.exists()))
            have = self._reserve.stat().st_size if self._reserve.exists() else 0
            # grown back only while the disk has room for it twice: it must not take the last free space
            if have < want and shutil.disk_usage(self.path.parent).free >= 2 * (want - have) + want:
                with open(self._reserve, "ab") as f:
                    f.write(os.urandom(want - have))
                    f.flush()
                    os.fsync(f.fileno())
        except OSError:
            pass

    def _may_delete(self, con, row, owner, teacher_key, teacher_handle=None):
        owner_h, code = row
        if owner is not None and valid_token(owner) and hmac.compare_digest(owner_h, _hash(owner)):
            return True
        if teacher_key is not None and code is not None and valid_token(teacher_key):
            want = _first(con.execute("SELECT teacher_key_hash FROM classes WHERE code=?", (code,)))
            if want is not None and hmac.compare_digest(want[0], _hash(teacher_key)):
                return True
        return code is not None and teacher_handle is not None and self._handle_code(teacher_handle) == code \
            and _class_open(con, code)

    def delete_owner(self, owner, class_code=None):
        """"Delete my phi": every phi of bank token `owner` (only those in `class_code` if
        given). Returns how many were deleted. Works on a full store."""
        owner_h = _check_token(owner)
        code = None if class_code is None else _check_code(class_code)
        if code is None:
            return self._delete(lambda con: con.execute("DELETE FROM phi WHERE owner=?", (owner_h,)).rowcount)
        return self._delete(lambda con: con.execute("DELETE FROM phi WHERE owner=? AND class_code=?",
                                                    (owner_h, code)).rowcount)

    # ------------------------------------------------------------------ classes
    def create_class(self, name):
        """(join code, teacher key) of a new class. Show the key once: only its hash is kept."""
        name = clean_name(name if name is not None else "", "class name", 40)
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

    def class_info(self, code, client=None) -> ClassInfo:
        """The class with join code `code`; StoreError if malformed or unknown. A code that
        names no class counts against `client` (an address): past Limits.join_failures in
        join_window_s, every lookup from it is refused for a while, right code or not."""
        code = _check_code(code)
        self._refuse_guessing(client)
        row = self._read(lambda con: _first(con.execute(CLASS_INFO_SQL, dict(code=code))))
        if row is None:
            self._count_failure(client)
            raise StoreError("no class has that code: check it with your teacher")
        return ClassInfo(*row[:4], *(int(x) for x in row[4:]))

    def join(self, code, client=None) -> ClassInfo:
        """class_info for a student joining: the class must be open. Wrong codes from one
        `client` are rate-limited (see class_info)."""
        info = self.class_info(code, client=client)
        if not info.is_open:
            raise StoreError(f"class {info.name!r} is closed")
        return info

    def usage(self, class_code):
        """What the class holds, for its teacher: {'phi', 'bytes' (distinct files), 'students',
        'phi_limit', 'bytes_limit'}."""
        info = self.class_info(class_code)
        return dict(phi=info.n_phi, bytes=info.bytes, students=info.students,
                    phi_limit=self.limits.class_count, bytes_limit=self.limits.class_bytes)

    def _refuse_guessing(self, client):
        if client is None:
            return
        with self._failures_lock:
            times = self._failures.get(client)
            while times and times[0] < time.monotonic() - self.limits.join_window_s:
                times.popleft()
            if times is not None and len(times) >= self.limits.join_failures:
                raise StoreError("too many wrong join codes from this address: wait a minute")

    def _count_failure(self, client):
        if client is None:
            return
        with self._failures_lock:
            if len(self._failures) > 10_000:  # memory stays bounded: forget clients quiet for a window
                old = time.monotonic() - self.limits.join_window_s
                self._failures = {c: t for c, t in self._failures.items() if t and t[-1] >= old}
            self._failures.setdefault(client, deque()).append(time.monotonic())

    def is_teacher(self, code, teacher_key):
        code = _check_code(code)
        if not valid_token(teacher_key):
            return False
        row = self._read(lambda con: _first(con.execute("SELECT teacher_key_hash FROM classes WHERE code=?", (code,))))
        return row is not None and hmac.compare_digest(row[0], _hash(teacher_key))

    def close_class(self, code, teacher_key=None, teacher_handle=None):
        """Close the class (its board stays readable; it takes no new phi; its teacher handles
        end). The teacher key, or a valid teacher handle for the class, only."""
        code = _check_code(code)
        with self._write() as con:
            row = _first(con.execute("SELECT teacher_key_hash FROM classes WHERE code=?", (code,)))
            if row is None:
                raise StoreError("no class has that code")
            by_key = valid_token(teacher_key) and hmac.compare_digest(row[0], _hash(teacher_key))
            if not by_key and not (teacher_handle is not None and self._handle_code(teacher_handle) == code
                                   and _class_open(con, code)):
                raise StoreError(NOT_TEACHER if teacher_handle is None else
                                 "your teacher sign-in has ended (it expired, or the class is closed): "
                                 "enter the teacher key again")
            con.execute("UPDATE classes SET closed=? WHERE code=? AND closed IS NULL", (time.time(), code))

    # ------------------------------------------------------------------ facts
    def stats(self):
        """{'phi', 'phi_bytes', 'classes', 'file_bytes'}: what the store holds (bytes of
        distinct files) and its size on disk (the database plus its write-ahead log)."""
        blobs = "phi" if self._version == 1 else "blobs"
        n, b, classes = self._read(lambda con: _first(con.execute(
            f"SELECT (SELECT COUNT(*) FROM phi), (SELECT COALESCE(SUM(bytes), 0) FROM {blobs}), "
            "(SELECT COUNT(*) FROM classes)")))
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return dict(phi=n, phi_bytes=b, classes=classes, file_bytes=size)

    def checkpoint(self, mode="TRUNCATE"):
        """Fold the write-ahead log into the database file (SQLite also does this by itself)."""
        assert mode in ("PASSIVE", "FULL", "RESTART", "TRUNCATE")
        if not self.read_only:
            self._read(lambda con: _first(con.execute(f"PRAGMA wal_checkpoint({mode})")))


CREATE = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS classes (
        code TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        teacher_key_hash TEXT NOT NULL,
        created REAL NOT NULL,
        closed REAL)""",
    """CREATE TABLE blobs (
        sha256 TEXT PRIMARY KEY,
        bytes INTEGER NOT NULL,
        data BLOB NOT NULL)                 -- a .safetensors file, once however many rows name it""",
    """CREATE TABLE phi (
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
        sha256 TEXT NOT NULL,               -- names its file in blobs
        created REAL NOT NULL,
        client TEXT)                        -- sha256 of the address it was saved from""",
)
MIGRATE_1_TO_2 = (  # schema 1 kept each file in its row (phi.data)
    CREATE[2],
    "INSERT OR IGNORE INTO blobs (sha256, bytes, data) SELECT sha256, bytes, data FROM phi ORDER BY id",
    "ALTER TABLE phi DROP COLUMN data",
    "ALTER TABLE phi ADD COLUMN client TEXT",
    "DROP INDEX IF EXISTS phi_class",  # replaced by phi_class_sha, which counts distinct files
    "DROP INDEX IF EXISTS phi_bytes",
)
INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS phi_place_name ON phi (owner, COALESCE(class_code, ''), name)",
    # covering indexes: the caps count rows and distinct files without reading a row
    "CREATE INDEX IF NOT EXISTS phi_owner ON phi (owner, class_code, bytes, sha256)",
    "CREATE INDEX IF NOT EXISTS phi_class_sha ON phi (class_code, sha256, bytes)",
    "CREATE INDEX IF NOT EXISTS phi_client ON phi (client, sha256, bytes)",
    "CREATE INDEX IF NOT EXISTS phi_sha ON phi (sha256)",
    "CREATE INDEX IF NOT EXISTS blobs_bytes ON blobs (bytes)",
    # the last row naming a file takes the file with it, whichever delete removed the row
    """CREATE TRIGGER IF NOT EXISTS phi_blob_gc AFTER DELETE ON phi
       WHEN NOT EXISTS (SELECT 1 FROM phi WHERE sha256 = OLD.sha256)
       BEGIN DELETE FROM blobs WHERE sha256 = OLD.sha256; END""",
)


def _scope(where):
    """Rows, bytes of distinct files, and whether this file is already among them, in one scope."""
    return (f"(SELECT COUNT(*) FROM phi WHERE {where}), "
            f"(SELECT TOTAL(bytes) FROM (SELECT DISTINCT sha256, bytes FROM phi WHERE {where})), "
            f"EXISTS (SELECT 1 FROM phi WHERE {where} AND sha256 = :sha)")


PLACE_SQL = (
    "SELECT (SELECT closed IS NULL FROM classes WHERE code = :code), "
    "(SELECT name FROM phi WHERE owner = :owner AND class_code IS :code AND (name = :name OR sha256 = :sha) LIMIT 1), "
    f"{_scope('owner = :owner')}, {_scope('class_code = :code')}, {_scope('client = :client')}, "
    "(SELECT TOTAL(bytes) FROM blobs), EXISTS (SELECT 1 FROM blobs WHERE sha256 = :sha)")
INSERT_PHI = """
INSERT INTO phi (owner, author, class_code, name, method, task, config, num_params, bytes, eval_exact,
                 base_fingerprint, sha256, created, client)
VALUES (:owner, :author, :code, :name, :method, :task, :config, :num_params, :size, :eval_exact, :fp, :sha, :now,
        :client)
"""
CLASS_INFO_SQL = (
    "SELECT code, name, created, closed, (SELECT COUNT(*) FROM phi WHERE class_code = :code), "
    "(SELECT TOTAL(bytes) FROM (SELECT DISTINCT sha256, bytes FROM phi WHERE class_code = :code)), "
    "(SELECT COUNT(DISTINCT owner) FROM phi WHERE class_code = :code) FROM classes WHERE code = :code")
RECORD_COLUMNS = ("id, owner, author, class_code, name, method, task, config, num_params, bytes, eval_exact, "
                  "base_fingerprint, sha256, created")


def _schema_version(con):
    """The file's schema version; None for a new, empty file."""
    if _first(con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'")) is None:
        return None
    row = _first(con.execute("SELECT value FROM meta WHERE key='schema_version'"))
    return int(row[0]) if row and str(row[0]).isdigit() else None


def _ro_uri(path, immutable=False):
    """A read-only URI: mode=ro never writes; immutable=1 also takes no lock and skips the log."""
    return f"file:{quote(str(Path(path).resolve()))}?mode=ro" + ("&immutable=1" if immutable else "")


def _size(path):
    try:
        return path.stat().st_size
    except OSError:
        return 0


_PROCESS_KEY = secrets.token_bytes(32)  # signs tokens where the store keeps no key (read-only, none yet)


def _first(cursor):
    """The first row or None, the statement run to its end (so no read stays open)."""
    rows = cursor.fetchall()
    return rows[0] if rows else None


def _waits(seconds):
    """Yield at once, then again after sleeps of 10 ms doubling to 200 ms, for `seconds` in all:
    the busy handler's polling, done here so that no lock is held while it sleeps."""
    deadline, delay = time.monotonic() + seconds, 0.01
    while True:
        yield
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(delay, left))
        delay = min(2 * delay, 0.2)


_WRITER_LOCKS, _WRITER_LOCKS_GUARD = {}, threading.Lock()


def _writer_lock(path):
    key = os.path.realpath(path)
    with _WRITER_LOCKS_GUARD:
        return _WRITER_LOCKS.setdefault(key, threading.Lock())


def _record(row):
    """A PhiRecord from a row, every field coerced to its type: a damaged or hand-edited row
    lists (and so can be deleted) instead of raising for the whole bank."""
    (phi_id, owner, author, code, name, method, task, config, num_params, size, eval_exact, fp, sha, created) = row
    try:
        config = json.loads(config)
    except (TypeError, ValueError, RecursionError):
        config = {}

    def num(x, kind, default):
        try:
            return kind(x)
        except (TypeError, ValueError, OverflowError):
            return default
    return PhiRecord(int(phi_id), str(owner), str(author or ""), None if code is None else str(code), str(name),
                     str(method), str(task), config if isinstance(config, dict) else {}, num(num_params, int, 0),
                     num(size, int, 0), None if eval_exact is None else num(eval_exact, float, None), str(fp),
                     str(sha), num(created, float, 0.0))


def _check_id(phi_id):
    """`phi_id` (an int or its digits) as an int SQLite can bind, or StoreError: 2**63 and up
    raise OverflowError in sqlite3, and a long string of digits is not parsed at all."""
    if isinstance(phi_id, bool) or not isinstance(phi_id, int):
        text = phi_id.strip() if isinstance(phi_id, str) else str(phi_id)
        if not ID_RE.fullmatch(text):
            raise StoreError(BAD_ID)
        phi_id = int(text)
    if not 1 <= phi_id <= MAX_ID:
        raise StoreError(BAD_ID)
    return phi_id


def _class_open(con, code):
    """Whether class `code` exists and is open."""
    return _first(con.execute("SELECT closed IS NULL FROM classes WHERE code=?", (code,))) == (1,)


def _base36(n):
    digits = ""
    while True:
        n, d = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
        if n == 0:
            return digits
