import pytest
import torch

import peftcore


@pytest.fixture(scope="session")
def base():
    return peftcore.load_base()


@pytest.fixture(scope="session")
def base_fp(base):
    return peftcore.fingerprint(base)


@pytest.fixture
def batch():
    return peftcore.TASKS["add_5"].batch(16, torch.Generator().manual_seed(1))
