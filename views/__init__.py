"""How each method looks in the app: one file per method (views/lora.py, views/adapter.py...),
as peftcore has one file per method. A view gives the method's display name and colour, the
controls a student may set (which a teacher's link may also name), its formulas and words,
and where its phi sits in the diagram of a block. Pages ask VIEWS (via ui) and never name a
method; a method without a view is still listed, under its peft_type, in grey.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import peftcore


@dataclass(frozen=True)
class Control:
    """One field of a method's config a student may set: a slider (lo, hi, step), pills
    choosing a subset of `options`, or, with `one`, a choice of one option (a toggle for
    (False, True)). `link` is its name in a teacher's link: unique across methods (LoRA's
    target_modules is not IA3's). Controls with a `group` are drawn folded under its title."""
    field: str
    label: str
    help: str = ""
    lo: float = None
    hi: float = None
    step: float = None
    options: tuple = None
    link: Optional[str] = None
    one: bool = False
    labels: tuple = None  # how each of `options` reads on the page (a choice)
    group: str = ""

    @property
    def name(self):
        return self.link or self.field

    @property
    def kind(self):
        if self.options is not None:
            return "toggle" if self.options == (False, True) else "choice" if self.one else "subset"
        return float if isinstance(self.step, float) else int

    def label_of(self, option):
        return self.labels[self.options.index(option)] if self.labels else str(option)

    def parse(self, text):
        """A link's text as this control's value; ValueError saying what it takes."""
        if self.kind in ("toggle", "choice"):
            found = [o for o in self.options if str(o).lower() == text.lower()]
            if not found:
                raise ValueError(f"must be one of {', '.join(str(o).lower() for o in self.options)}")
            return found[0]
        if self.kind == "subset":
            names = [t for t in text.split(",") if t]
            if not names or any(t not in self.options for t in names):
                raise ValueError(f"must be a comma-separated subset of {', '.join(self.options)}")
            return names
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not self.lo <= value <= self.hi or (self.kind is int and value != int(value)):
            raise ValueError(f"must be {'a whole' if self.kind is int else 'a'} number from {self.lo} to {self.hi}")
        return self.kind(value)


@dataclass(frozen=True)
class Diagram:
    """A method's phi in the block diagram: dot lines of its own nodes and edges, the
    block's edges it reroutes (`skip`), and block nodes it turns into phi (`phi`)."""
    lines: tuple = ()
    skip: frozenset = frozenset()
    phi: frozenset = frozenset()


@dataclass(frozen=True)
class Benchmark:
    """HF peft's own figure for a method (PEFT_BENCHMARK): its test accuracy and the setting
    peft ran, quoted as peft's, never measured here."""
    accuracy: float
    setting: str
    trainable: int


PEFT_BENCHMARK = ("HF peft's method comparison: Llama-3.2-3B trained 5,000 steps on MetaMathQA, GSM8K test "
                  "accuracy (github.com/huggingface/peft, method_comparison/MetaMathQA/results)")


@dataclass(frozen=True)
class Variant:
    """A method with some config options set, shown as a member of its family (DoRA is LoRA
    with use_dora): `options` as bench.presets records it (presets.variant_key)."""
    name: str
    options: dict
    trains: str
    benchmark: Optional[Benchmark] = None
    why: str = ""  # where its preset solves less than the method's own: what it reaches and why


@dataclass(frozen=True)
class MethodView:
    peft_type: str
    name: str                      # as the pages show it (and a teacher's link names it)
    color: str                     # apart from every other under colour blindness (tests/test_palette.py)
    dash: str = "solid"            # plotly's dash and marker: colour is never the only cue
    symbol: str = "circle"
    controls: tuple = ()
    formulas: tuple = ()           # LaTeX, for the Inside page
    words: str = ""
    diagram: Callable = lambda config: Diagram()
    note: str = ""                 # shown where its controls would be (full fine-tuning has none)
    never_solves: str = ""         # why its preset solves nothing here, when the table says so
    lesson: str = ""               # what the Inside page's table of every method says about it
    rank: Optional[Callable] = None  # config -> the rank of its update (the spectrum's marker)
    explain: Optional[Callable] = None  # config -> what the chosen options change, in a sentence or two
    family: str = ""               # the family the Inside page's family table groups it in
    trains: str = ""               # what its phi is, in a few words (the family table)
    benchmark: Optional[Benchmark] = None  # HF peft's figure for it
    variants: tuple = ()           # Variants: the family members that are options of it
    in_default_race: bool = True   # False: the race offers it, unselected (a family member beside its head)
    not_in_hf_peft: str = ""       # where HF peft has no such method: what to use instead

    @property
    def method(self):
        return peftcore.METHODS[self.peft_type]


VIEWS = {}  # peft_type -> MethodView


def register_view(view):
    VIEWS[view.peft_type] = view
    return view


def view_of(peft_type):
    return VIEWS.get(peft_type) or MethodView(peft_type, peft_type, "#6b6b6b", dash="dot", symbol="star")


def all_views():
    """A view for every registered method, in the registry's order."""
    return [view_of(t) for t in peftcore.METHODS]


# ------------------------------------------------------------------ the block diagram
# The block's own path: (node, label) in order; every arrow between consecutive nodes.
BLOCK = [("x", "x"), ("ln1", "LayerNorm"), ("q", "q"), ("attn", "attention"), ("o", "o"),
         ("add1", "+"), ("ln2", "LayerNorm"), ("up", "up"), ("gelu", "GELU"), ("down", "down"),
         ("add2", "+"), ("out", "to the next block")]
# Each projection's neighbours on the block's path: (the node before it, the node after it).
AROUND = {"q": ("ln1", "attn"), "k": ("ln1", "attn"), "v": ("ln1", "attn"), "o": ("attn", "add1"),
          "up": ("ln2", "gelu"), "down": ("gelu", "add2")}
PHI_STYLE = 'fillcolor="#ffb74d", color="#e65100", penwidth=2'  # how a phi node looks
PHI_EDGE = '[color="#e65100"]'


def block_dot(view, config):
    """A Graphviz diagram of one transformer block with the method's phi in orange."""
    d = view.diagram(config)
    lines = ['digraph { rankdir=TB; bgcolor="transparent"; nodesep=0.15; ranksep=0.2;',
             'node [shape=box, style="rounded,filled", fillcolor="#e3f2fd", color="#1565c0", fontname="sans-serif", '
             'fontsize=10, margin="0.06,0.03", height=0.2, width=0.2];',  # Streamlit's CSS draws svg text at ~10px
             'edge [penwidth=1.5, arrowsize=0.7, fontname="sans-serif", fontsize=10];']
    for node, label in BLOCK + [("k", "k"), ("v", "v")]:
        shape = ", shape=circle" if label == "+" else ""
        lines.append(f'{node} [label="{label}"{shape}{", " + PHI_STYLE if node in d.phi else ""}];')
    path = [node for node, _ in BLOCK]
    edges = list(zip(path, path[1:])) + [("ln1", "k"), ("k", "attn"), ("ln1", "v"), ("v", "attn")]
    lines += [f"{a} -> {b};" for a, b in edges if (a, b) not in d.skip]
    lines.append('x -> add1 [style=dashed, label=" residual"]; add1 -> add2 [style=dashed, label=" residual"];')
    lines += list(d.lines)
    lines.append("}")
    return "\n".join(lines)


def phi_node(name, label):
    return f'{name} [label="{label}", {PHI_STYLE}];'


def beside_projections(cfg, slug, label):
    """A phi node beside each targeted projection, fed by what feeds it and feeding what it
    feeds (an update added to the projection's output): `label(target)` names each node."""
    lines = []
    for t in cfg.target_modules:
        before, after = AROUND[t]
        lines += [phi_node(f"{slug}_{t}", label(t)), f"{before} -> {slug}_{t} {PHI_EDGE}; {slug}_{t} -> {after} {PHI_EDGE};"]
    return Diagram(tuple(lines))


# every method's view, in its own file (each registers itself)
from . import adapter, full, ia3, loha, lokr, lora, prefix, prompt, vera  # noqa: E402,F401
