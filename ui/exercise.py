"""The exercise-link engine: a teacher's link such as /train?task=sort&method=LoRA&r=2&only=r
sets the Train page's controls, says which a student may change (only=, or lock=) and which they
do not even see (hide=). Read once per session; a value that does not fit is reported, never
trusted."""
import streamlit as st

import peftcore
import views
from peftcore.presets import PRESETS

from .frame import method_views, ss
from .text import link_value


# the slider's stops, and every preset's own rate (a preset's default must be a stop)
LR_OPTIONS = sorted({1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2, 1e-1}
                    | {p.train["lr"] for p in PRESETS.values()})
STEPS_CONTROL = views.Control("steps", "Steps", lo=10, hi=1000, step=10)  # the slider's range; parses a link's steps=
STEPS = dict(min_value=STEPS_CONTROL.lo, max_value=STEPS_CONTROL.hi, step=STEPS_CONTROL.step)


def set_control(key, value):
    """Set a control's value from code (a link, a reopened run) before its widget is drawn."""
    ss[key] = value
    ss.setdefault("just_set", set()).add(key)


def unless_set(key, default):
    """A widget's default, or None in the run where code set its value (Streamlit warns when
    both come in one run). Always the default otherwise: a widget the browser draws afresh
    starts from its default, which must be the preset, never empty."""
    just_set = ss.get("just_set", set())
    if key in just_set:
        just_set.discard(key)
        return None
    return default


def _choice(options):
    def parse(text):
        match = [o for o in options if str(o) == text or (isinstance(o, float) and _float(text) == o)]
        if not match:
            raise ValueError(f"must be one of {', '.join(f'{o:g}' if isinstance(o, float) else str(o) for o in options)}")
        return match[0]
    return parse


def _float(text):
    try:
        return float(text)
    except ValueError:
        return None


def method_key(view, control):
    """The session key of a method's control: one per method and field."""
    return f"{view.method.slug}.{control.field}"


def link_controls():
    """Every control a teacher's link may name -> (session key, parser): the task, the method,
    each method's own controls (from its view), the learning rate and the steps."""
    out = {"task": ("task", _choice(list(peftcore.TASKS))),
           "method": ("method", _choice([v.name for v in method_views()]))}
    for view in method_views():
        for c in view.controls:
            out[c.name] = (method_key(view, c), c.parse)
    out.update({"lr": ("lr-{method}", _choice(LR_OPTIONS)), "steps": ("steps-{method}", STEPS_CONTROL.parse)})
    return out


CONTROLS = link_controls()


def _names(text, problems, what):
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in CONTROLS]
    if unknown:
        problems.append(f"{what}={link_value(text)}: no control named {link_value(', '.join(unknown))}; ignored")
    return {n for n in names if n in CONTROLS}


def exercise():
    """The link's exercise, read once per session: its values set the controls; a value
    that does not fit is reported and the control keeps its default."""
    if "exercise" not in ss:
        q, values, problems = st.query_params, {}, []
        for name, (_, parse) in CONTROLS.items():
            if name in q:
                try:
                    values[name] = parse(q[name])
                except ValueError as e:
                    problems.append(f"{name}={link_value(q[name])} {e}; reset to the default")
        locked = _names(q.get("lock", ""), problems, "lock")
        if "only" in q:
            locked |= set(CONTROLS) - _names(q["only"], problems, "only")
        hidden = _names(q.get("hide", ""), problems, "hide")
        method = values.get("method", method_views()[0].name)
        for name, value in values.items():
            set_control(CONTROLS[name][0].format(method=method), value)
        ss["exercise"] = dict(values=values, locked=locked, hidden=hidden, problems=problems)
    return ss["exercise"]


def from_exercise():
    """Whether this session came through an exercise link (its values, locks, hides or even
    its faulty values): a student's page, which shows no teacher tools."""
    ex = exercise()
    return bool(ex["values"] or ex["locked"] or ex["hidden"] or ex["problems"])


def shown(name):
    """Whether the page may show control `name` or its value: what an exercise hides, it hides
    everywhere (the captions and result cards too, not only the widget)."""
    return name not in exercise()["hidden"]


def control(name, default, draw):
    """Draw a control (disabled if the exercise locks it), or, if it hides it, use the
    link's value unseen."""
    ex = exercise()
    if name in ex["hidden"]:
        return ex["values"].get(name, default)
    return draw(disabled=name in ex["locked"])
