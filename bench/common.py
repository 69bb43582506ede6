"""Shared benchmark setup: one torch thread, and a line that names the machine."""
import os
import platform

import torch

torch.set_num_threads(1)  # see BENCHMARKS.md: on 2 shared cores one thread per op is faster


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """One line naming where a figure was measured. The first comma-separated field is the
    CPU model; the kernels are what torch dispatches to (ATEN_CPU_CAPABILITY can lower them,
    which changes float rounding: a cheap way to mimic an older CPU)."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    kernels = torch.backends.cpu.get_cpu_capability()
    return (f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{kernels} kernels, {gpu}, torch {torch.__version__}")


class LiveUpdates:
    """What a student saw of a live run, for a class benchmark's Student (a browser's or a
    simulated one): it provides `first_step`, `result_at` and `updates(start, end)`."""

    def running_updates(self):
        """Progress changes while training: from the first step shown to the result."""
        start, end = self.first_step, self.result_at
        return self.updates(start, end) if start and end else []

    @property
    def live_rate(self):
        u = self.running_updates()
        return (len(u) - 1) / (u[-1] - u[0]) if len(u) >= 2 and u[-1] > u[0] else None

    @property
    def max_gap(self):
        u = self.running_updates()
        return max(b - a for a, b in zip(u, u[1:])) if len(u) >= 2 else None


def pct(values, q):
    """The q-quantile (nearest rank) of the values that are not None, or None."""
    values = sorted(v for v in values if v is not None)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else None


def fmt(x, spec=".1f", none="-"):
    """A table cell: `x` formatted, or `none` for a missing figure."""
    return none if x is None else format(x, spec)
