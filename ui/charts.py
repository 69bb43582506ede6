"""Charts styled for a projector: plotly figures built as plain dicts, their log ticks, and how
they are shown."""
import plotly.graph_objects as go
import streamlit as st


PEFT_COLOR = "#1f77b4"  # the bold PEFT curve of the storage charts: the idea, not one method
FONT = dict(size=20)
GRID = dict(gridcolor="#e5e5e5", zerolinecolor="#cccccc", automargin=True)
# A white background set by hand: a named template costs ~10 ms a figure to build and copy.
LAYOUT = dict(font=FONT, template="none", paper_bgcolor="white", plot_bgcolor="white",
              margin=dict(l=70, r=30, t=60, b=60),
              legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, font=FONT),
              hoverlabel=dict(font=dict(size=18)))


def figure(traces, **layout):
    """A plotly figure as a plain dict (fast to build), styled for a projector. A log axis
    without tickvals or dtick of its own gets log_ticks over its traces' values."""
    for axis in [k for k in layout if k.startswith(("xaxis", "yaxis"))]:
        layout[axis] = {**GRID, **layout[axis]}
        if isinstance(layout[axis].get("title"), str):
            # plotly.js reads an axis title from title.text only: without plotly's validation
            # (skipped, see plot()) a plain string would draw no title at all
            layout[axis]["title"] = dict(text=layout[axis]["title"])
        if layout[axis].get("type") == "log" and not {"tickvals", "dtick"} & set(layout[axis]):
            values = _axis_values(traces, axis)
            layout[axis].update(log_ticks(min(values), max(values)) if values else dict(nticks=6))
    return {"data": traces, "layout": {**LAYOUT, **layout}}


def _axis_values(traces, axis):
    """The positive values the traces plot on `axis` ("xaxis", "yaxis2"...)."""
    letter, ref = axis[0], axis[0] + axis[5:]  # "yaxis2" -> "y", "y2"
    return [v for t in traces if t.get(f"{letter}axis", letter) == ref
            for v in t.get(letter) or () if isinstance(v, (int, float)) and 0 < v < float("inf")]


def log_ticks(low, high):
    """tickvals and ticktext for a log axis over [low, high] (both > 0), in plain numbers:
    1, 10, 100, 1,000 over more than two decades; 1, 2, 5, 10, 20, 50 within two; finer,
    then evenly spaced, where those leave fewer than three ticks in the range (a short
    run's loss from 1.6 to 2.9 would show "2" alone). Plotly's own log ticks label the 2s and 5s between
    decades in small type ("5, 2, 100, 5, 2")."""
    import math
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    ladders = [(1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7)][0 if math.log10(high / low) > 2.05 else 1:]
    for steps in ladders:
        values = [float(f"{m}e{e}") for e in range(first, last + 1) for m in steps]  # exact decimals
        if sum(low <= v <= high for v in values) >= 3:
            break
    else:
        values = even_ticks(low, high)
    return dict(tickmode="array", tickvals=values, ticktext=[_tick_text(v) for v in values])


def even_ticks(low, high):
    """Round values a step of 1, 0.5, 0.25 or 0.2 times a power of ten apart, the widest
    step with 3 or more inside [low, high], and one more past each end."""
    import math
    if high <= low:
        return [low]
    top = 10 ** math.ceil(math.log10(high - low))
    step = next(s for s in (top * m / 10 ** k for k in range(3) for m in (1, 0.5, 0.25, 0.2))
                if math.floor(high / s + 1e-9) - math.ceil(low / s - 1e-9) + 1 >= 3)  # (2.3 / 0.1 = 22.99...)
    first, last = math.ceil(low / step - 1e-9) - 1, math.floor(high / step + 1e-9) + 1
    return [v for v in (float(f"{i * step:.12g}") for i in range(first, last + 1)) if v > 0]


def _tick_text(v):
    return f"{v:,.0f}" if v >= 1 and v == int(v) else f"{v:g}"


def plot(fig, summary, key=None, height=None):
    """Show a figure() dict and, under it, `summary`: what the chart shows in words, with its key
    numbers (a chart is a picture a screen reader cannot read, and a projector's back row may
    not read its ticks). The figure is built by code, not typed by a user, so plotly's
    validation of a dict (~10 ms of GIL per chart, every rerun and live refresh) is skipped."""
    st.plotly_chart(_BuiltFigure(fig), theme=None, width="stretch", height=height or "content", key=key,
                    config={"displaylogo": False, "displayModeBar": False})
    st.caption(summary)


class _BuiltFigure(go.Figure):
    """A figure dict that st.plotly_chart takes as already validated."""

    def __init__(self, fig):  # deliberately no go.Figure.__init__: that is the validation
        self._fig = fig

    def to_dict(self):
        return self._fig
