"""Where a run trains: the executors of the run service (runs.py decides when).

An executor opens a session per lane (a training slot); a session takes runs (`add`),
steps them together (`step`: (run, TrainEvent or the exception that ended it), several
per run allowed, in order) and lets a finished run go (`remove`: its phi is final).

- InProcess, the default: a lane is a thread of this process stepping a Cohort of the
  runs' live models (`streamlit run app.py`, notebooks, most tests).
- Ray (ray_executor.py): a lane drives a worker process. A run travels there as data, its
  RunSpec (config, task, seed, base, training arguments); the worker rebuilds it with WorkerRuns
  (below: no Ray in it) on its own copy of the shipped base, trains it with the same
  Trainer and Cohort, and sends back its events and phi's file bytes, which load_trained
  loads through the same checks as an uploaded file.
"""
import json
import time
from dataclasses import asdict, dataclass, field

from ..methods import registry
from ..base import fingerprint, load_base, random_base
from ..cohort import Cohort, cohort_key
from ..peft_model import PeftModel, get_peft_model
from ..serialization import adapter_to_bytes, load_adapter
from ..train import Trainer, resolve_device

# The bases a run may train on, by name: every process rebuilds them from the shipped file
# (the random-base control from its fixed seed), so a name and a fingerprint are enough.
SHIPPED_BASES = {"pretrained": load_base, "random": random_base}
ADAPTER = "default"  # get_peft_model's adapter name: the one a run trains
_LOADED = {}  # (name, device) -> a shipped base this process loaded


def shipped_base(name, device="cpu"):
    """A shipped base by name, loaded once per process and device: a RunManager's bases where
    its caller gives none (a script, a test; the app gives its own shared ones)."""
    if name not in SHIPPED_BASES:
        raise BaseMismatch(f"no shipped base is named {name!r}; known: {', '.join(SHIPPED_BASES)}")
    if (name, device) not in _LOADED:
        _LOADED[name, device] = SHIPPED_BASES[name](device=device)
    return _LOADED[name, device]


class BaseMismatch(ValueError):
    """A run asked for a base this process does not hold (another base file shipped here)."""


class RemoteError(RuntimeError):
    """An error a worker process reported, as one line ("ValueError: ...")."""


def describe(error):
    """One line for the visitor: the error's type and message, no traceback."""
    return str(error) if isinstance(error, RemoteError) else f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class RunSpec:
    """A whole run as data, what both executors receive: the method config (as
    adapter_config.json has it, peft_type included), the task, the seed (of phi's initial
    values and of the batches), which shipped base and its fingerprint (a worker holding
    another base refuses the run), and train()'s other keyword arguments (steps, lr, batch
    size, device...). Equal keys train bit-identical phi."""
    config: dict
    task: str = "times_3"
    seed: int = 0
    base: str = "pretrained"
    fingerprint: str = ""
    train: dict = field(default_factory=dict)  # train()'s keyword arguments but the seed

    def __post_init__(self):
        if "seed" in self.train:
            raise ValueError("a run's seed is RunSpec.seed, not one of its training arguments")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)

    @property
    def train_kwargs(self):
        """train()'s keyword arguments, the seed among them."""
        return {**self.train, "seed": self.seed}

    def key(self):
        """What makes two runs the same computation: the base (its fingerprint), the method
        config, the task and every training argument."""
        return (self.fingerprint, json.dumps(self.config, sort_keys=True), self.task,
                json.dumps(self.train_kwargs, sort_keys=True))

    def make_config(self):
        """The config object, checked as a file's would be (an unknown method is an error)."""
        cfg = registry.method_of(self.config.get("peft_type")).config_cls.from_dict(self.config)
        cfg.validate()
        return cfg

    def build(self, base):
        """The run's untrained model over `base`, exactly as get_peft_model makes it here."""
        return get_peft_model(base, self.make_config(), ADAPTER, seed=self.seed)

    def cohort_key(self, batch_size=64):
        """Runs with equal keys may ride in one cohort on one worker (None: alone)."""
        method = registry.method_of(self.config.get("peft_type"))
        kind = method.cohort_kind(self.make_config()) if method.cohort_kind else None
        return None if kind is None else (self.base, self.fingerprint, kind, batch_size)


def load_trained(base, data):
    """A trained run's model over `base` from phi's file bytes (from a worker), loaded with
    the checks of an uploaded file (serialization.load_adapter: AdapterLoadError on any)."""
    model = PeftModel(base)
    load_adapter(model, ADAPTER, data)
    model.set_adapter(ADAPTER)
    return model.eval()


# ------------------------------------------------------------------ in-process
class InProcess:
    """Lanes as threads of this process, each stepping a Cohort of live models."""
    needs_model = True  # a run carries its model (built in RunManager.start)
    slots = None  # RunManager's default: one lane per core

    def cohort_key(self, run):
        return cohort_key(run.model, run.kwargs.get("batch_size", 64), resolve_device(run.kwargs.get("device", "auto")))

    def open(self, run):
        return CohortSession()


class CohortSession:
    """A lane's runs as Trainers in one Cohort (a cohort of one steps as plain train())."""

    def __init__(self):
        self.cohort, self.trainer_of, self.run_of = Cohort(), {}, {}

    def __len__(self):
        return len(self.cohort.trainers)

    def add(self, run):
        trainer = Trainer(run.model, run.task, **run.kwargs)
        self.cohort.add(trainer)
        self.trainer_of[run], self.run_of[trainer] = trainer, run

    def step(self):
        try:
            results = self.cohort.step()
        except Exception as e:  # the whole step failed: every run in it ends
            results = [(t, e) for t in list(self.cohort.trainers)]
        return [(self.run_of[t], r) for t, r in results]

    def remove(self, run):
        trainer = self.trainer_of.pop(run, None)
        if trainer is not None:
            self.run_of.pop(trainer)
            if trainer in self.cohort.trainers:
                self.cohort.remove(trainer)
        if run.model is not None:
            run.model.eval()

    def close(self):
        pass


# ------------------------------------------------------------------ a worker process's side
@dataclass(eq=False)
class WorkerRun:
    """A run as a worker process holds it: what CohortSession steps."""
    id: str
    model: object
    task: str
    kwargs: dict = field(default_factory=dict)


class WorkerRuns:
    """What a worker process does with runs sent as data: rebuild each on its own copy of
    the shipped base (refusing another fingerprint), step them as one CohortSession, and
    hand back events and phi's bytes. Errors come back as one line, never a traceback."""

    def __init__(self, device="cpu"):
        self.device = device
        self.bases = {}  # name -> (base, fingerprint), loaded on first use
        self.session = CohortSession()
        self.runs = {}  # run id -> a run as CohortSession knows one

    def base(self, name):
        if name not in self.bases:
            base = shipped_base(name, self.device)
            self.bases[name] = base, fingerprint(base)
        return self.bases[name]

    def add(self, run_id, spec):
        """Rebuild and queue run `run_id` from its spec (a dict); None, or the reason it cannot train."""
        try:
            spec = RunSpec.from_dict(spec)
            base, have = self.base(spec.base)
            if spec.fingerprint and spec.fingerprint != have:
                raise BaseMismatch(f"this worker's {spec.base} base is {have[:16]}..., the run was set up on "
                                   f"{spec.fingerprint[:16]}...: the web server and the worker hold different base "
                                   "files (update both to the same version)")
            run = WorkerRun(run_id, spec.build(base), spec.task,
                            {**spec.train_kwargs, "device": self.device})  # a worker trains on its own device
            self.session.add(run)
        except Exception as e:  # noqa: BLE001 - the reason travels back as one line
            return describe(e)
        self.runs[run_id] = run
        return None

    def step(self, max_s=0.0):
        """Step every run at least once, and again until `max_s` seconds passed or one ended:
        [(run id, TrainEvent or None, error line or None)], in order."""
        out, t0 = [], time.perf_counter()
        while self.session:
            ended = False
            for run, result in self.session.step():
                failed = isinstance(result, Exception)
                out.append((run.id, None if failed else result, describe(result) if failed else None))
                if failed or result.done:
                    ended = True
                    self.session.remove(run)
            if ended or time.perf_counter() - t0 >= max_s:
                break
        return out

    def finish(self, run_id):
        """Let run `run_id` go; phi's file bytes (None if it never trained here)."""
        run = self.runs.pop(run_id, None)
        if run is None:
            return None
        self.session.remove(run)
        return adapter_to_bytes(run.model, ADAPTER)
