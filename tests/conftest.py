import pytest
import torch

import peftcore

# One intra-op thread: this model's matmuls are tiny, and on a shared 2-core machine two
# OpenMP threads per op run several times slower than one (see BENCHMARKS.md).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def base():
    return peftcore.load_base()


@pytest.fixture(scope="session")
def base_fp(base):
    return peftcore.fingerprint(base)


@pytest.fixture
def batch():
    return peftcore.TASKS["add_5"].batch(16, torch.Generator().manual_seed(1))
