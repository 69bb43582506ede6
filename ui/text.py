"""Text for the page: user-given names and link values made safe for markdown, numbers, sentences
and tables."""
import math
import re

import streamlit as st

from peftcore.storage import human_bytes


MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~:$=])")


def plain(text, limit=60):
    """User-given text (a name, a link's value) for a markdown string: every markdown
    character escaped, so `__x__` stays `__x__` and `![](http://...)` fetches nothing;
    cut to `limit` characters."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "…"
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def serving_metrics(times, n_rows):
    """The mixed batch against swapping phi per request, both for the same n_rows requests."""
    mixed, swap = times["mixed_s"], times["swap_s"]
    requests = f"{n_rows} request{'s' * (n_rows != 1)}"
    with st.container(horizontal=True, gap="large"):  # each metric as wide as it needs: nothing cut off
        st.metric(f"{requests} in one mixed batch", f"{1000 * mixed:.1f} ms", width="content",
                  help="every row with its own phi, in one pass per output digit")
        st.metric(f"{requests}, swapping phi", f"{1000 * swap:.1f} ms", width="content",
                  help=f"set_adapter, then one request at a time: {1000 * swap / n_rows:.2f} ms per request")
        ratio = swap / mixed
        st.metric("mixed batch against swapping", f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower",
                  width="content",
                  help="With few rows or one phi, routing rows costs more than it saves; it pays off with many tasks.")


def literal(text, limit=60):
    """Visitor-controlled text (a link's value, a file's name, a name) for any markdown string,
    as an inline code span: markdown reads nothing inside one, so no link, image, autolink or
    formatting can come of it. Cut to `limit` characters, on one line."""
    text = "".join(c if c.isprintable() else " " for c in str(text))
    if len(text) > limit:
        text = text[:limit] + "…"
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


PLAIN_WORDS = re.compile(r"[A-Za-z0-9]+([ _'-][A-Za-z0-9]+)*")  # markdown reads nothing in these


def as_text(text, limit=60):
    """Visitor text that reads as it is where markdown would find nothing in it ("Monday group",
    "lora-times_3"), else a literal: a name stays readable, a crafted one stays inert."""
    text = str(text)
    return text if len(text) <= limit and PLAIN_WORDS.fullmatch(text) else literal(text, limit)


def link_value(value, limit=40):
    """A value from the page's link, as a page echoes it: quoted, cut short, plain text."""
    value = str(value)
    return literal(repr(value if len(value) <= limit else value[:limit] + "…"), limit + 10)


def storage_sentence(phi_bytes, tasks, base_bytes):
    """What a bank or a class stores, counted plainly: n phi over k tasks on one base, against
    the same n fine-tunes kept as whole models (like with like: one model per phi)."""
    n, k = len(phi_bytes), len(set(tasks))
    total = base_bytes + sum(phi_bytes)
    return (f"**{n} phi** for {k} task{'s' * (k != 1)}, stored as one base ({human_bytes(base_bytes)}) plus their "
            f"files: **{human_bytes(total)}**, {total / base_bytes:.3f} base models. The same {n} fine-tune{'s' * (n != 1)} "
            f"as whole models (full fine-tuning, one copy each) would take {human_bytes(n * base_bytes)} "
            f"({n} base model{'s' * (n != 1)}).")


def fmt_num(x, near=None):
    """Short numbers for sentences: 1.5, 100, 1.005, 12,345. With `near`, as many digits
    as it takes not to read as `near`: fmt_num(1.00010001, near=1) is 1.0001, not 1."""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    digits = 4
    if near is not None and x != near and x != 0:
        import math
        digits = max(digits, math.floor(math.log10(abs(x))) - math.floor(math.log10(abs(x - near))) + 2)
    return f"{x:.{digits}g}"


def predictions_table(rows):
    """Inputs, targets and greedy outputs, wrong output digits highlighted in red."""
    right, wrong = ":green[:material/check_circle: right]", ":red[:material/cancel: wrong]"
    lines = ["| task | input | target | output | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        out = "".join(f":red-background[**{c}**]" if bad else c for c, bad in zip(r["output"], r["wrong"]))
        lines.append(f"| {plain(r['task'], 80)} | {r['input']} | {r['target']} | {out} | "
                     f"{right if r['correct'] else wrong} |")
    st.markdown("\n".join(lines))


def start_sentence(loss):
    """What the base's loss on each new task before training says, against a uniform guess (ln 10):
    below it, the base leans towards the right digits; above it, it is confidently wrong."""
    uniform = math.log(10)
    losses = ", ".join(f"{name} {value:.2f}" for name, value in loss.items())
    wrong = [name for name, value in loss.items() if value > uniform]
    verdict = (f"On {', '.join(wrong)} it starts above that: confidently wrong, sure of the digits its pretraining "
               "taught, which phi must overturn" if wrong else
               "Every task starts at or below that: the base is unsure, not confidently wrong")
    return (f"Before any training, its loss on each downstream task, in nats per answer digit: {losses}. A uniform "
            f"guess over the ten digits scores ln 10 = {uniform:.2f}. {verdict}.")
