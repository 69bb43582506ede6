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
