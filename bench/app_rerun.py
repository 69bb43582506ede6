"""Server time of the storage page's rerun after a widget move (target: median <= 50 ms).

    python -m bench.app_rerun [--reruns 30]

Runs the app in-process with streamlit's AppTest and moves one control per rerun. "script"
is the server's work: ScriptRunner._run_script, the whole of app.py (navigation, sidebar) and
the storage page with its plotly figure. "AppTest.run" adds AppTest's own overhead.
"""
import argparse
import statistics
import time

import torch
from streamlit.runtime.scriptrunner.script_runner import ScriptRunner
from streamlit.testing.v1 import AppTest

from harness.servers import ROOT


SCRIPT_TIMES = []


def timed(run_script):
    def wrapper(self, rerun_data):
        t0 = time.perf_counter()
        try:
            return run_script(self, rerun_data)
        finally:
            SCRIPT_TIMES.append(time.perf_counter() - t0)
    return wrapper


def time_moves(at, widget, values, reruns):
    """(script seconds, AppTest.run seconds) of each rerun, cycling `widget` through `values`."""
    script, total = [], []
    for i in range(reruns):
        widget().set_value(values[i % len(values)])
        SCRIPT_TIMES.clear()
        t0 = time.perf_counter()
        at.run()
        total.append(time.perf_counter() - t0)
        script.append(sum(SCRIPT_TIMES))
        assert not at.exception, at.exception[0].value
        assert at.sidebar.button, "app.py did not run"
    return script, total


def ms(times):
    times = sorted(1000 * t for t in times)
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reruns", type=int, default=30, help="reruns per control (at least 20)")
    args = ap.parse_args()
    ScriptRunner._run_script = timed(ScriptRunner._run_script)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()  # loads the base, the library and imports: not what a slider move costs
    moves = {
        "phi slider p": (lambda: at.select_slider(key="p"), [0.5, 2.0, 0.01, 1.0]),
        "tasks T": (lambda: at.select_slider(key="T"), [1000, 10, 10000, 100]),
        "log axes": (lambda: at.toggle(key="log"), [True, False]),
        "y in bytes": (lambda: at.radio(key="unit"), ["bytes", "base models"]),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.reruns} reruns per control")
    print("| control moved | script median ms | script p90 ms | AppTest.run median ms |")
    print("|---|---:|---:|---:|")
    for name, (widget, values) in moves.items():
        script, total = time_moves(at, widget, values, args.reruns)
        (med, p90), (total_med, _) = ms(script), ms(total)
        print(f"| {name} | {med:.1f} | {p90:.1f} | {total_med:.1f} |")


if __name__ == "__main__":
    main()
