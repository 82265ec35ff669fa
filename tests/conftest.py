import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one worker per core: no oversubscription


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
