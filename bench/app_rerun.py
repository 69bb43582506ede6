"""Server time of the storage page's rerun after a widget move (target: median <= 50 ms).

    python -m bench.app_rerun [--reruns 30]

Runs the app in-process with streamlit's AppTest, moves one control per rerun and times
`AppTest.run()`: the whole script (sidebar, navigation, page, the plotly figure) plus
AppTest's own overhead, so the figure is an upper bound on the server's work.
"""
import argparse
import statistics
import time

import torch
from streamlit.testing.v1 import AppTest

from bench.appserver import ROOT


def time_moves(at, widget, values, reruns):
    """Seconds of each rerun, cycling `widget` through `values`."""
    times = []
    for i in range(reruns):
        widget().set_value(values[i % len(values)])
        t0 = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t0)
        assert not at.exception, at.exception[0].value
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reruns", type=int, default=30, help="reruns per control (at least 20)")
    args = ap.parse_args()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()  # loads the base, the library and imports: not what a slider move costs
    moves = {
        "phi slider p": (lambda: at.select_slider(key="p"), [0.5, 2.0, 0.01, 1.0]),
        "tasks T": (lambda: at.select_slider(key="T"), [1000, 10, 10000, 100]),
        "log axes": (lambda: at.toggle(key="log"), [True, False]),
        "y in bytes": (lambda: at.radio(key="unit"), ["bytes", "base models"]),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.reruns} reruns per control")
    print("| control moved | median ms | p90 ms | min ms |")
    print("|---|---:|---:|---:|")
    for name, (widget, values) in moves.items():
        ms = sorted(1000 * t for t in time_moves(at, widget, values, args.reruns))
        print(f"| {name} | {statistics.median(ms):.1f} | {ms[int(0.9 * (len(ms) - 1))]:.1f} | {ms[0]:.1f} |")


if __name__ == "__main__":
    main()
