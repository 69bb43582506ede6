"""What every method's config shares: a peft_type and a round trip through JSON."""
from dataclasses import asdict, dataclass, fields


@dataclass
class PeftConfig:
    peft_type = "BASE"  # class attribute: HF peft's name for the method

    def to_dict(self):
        d = asdict(self)
        d["peft_type"] = self.peft_type
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"peft_type"}
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kwargs)

    def validate(self):
        """Raise ValueError naming the bad field. Subclasses add their checks."""


def check_range(name, value, lo, hi, kind=(int,)):
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number from {lo} to {hi}, got {value!r}")


def cache_key(named_tensors):
    """Changes whenever one of the tensors is written in place, moved or replaced:
    the key for caches of stacked phi weights (mixed batches)."""
    return tuple((name, t.data_ptr(), t._version, t.dtype) for name, t in named_tensors)
