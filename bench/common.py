"""Shared benchmark setup: one torch thread, and a line that names the machine."""
import platform

import torch

torch.set_num_threads(1)  # see BENCHMARKS.md: on 2 shared cores one thread per op is faster


def machine():
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} torch threads, {gpu}, torch {torch.__version__}"
