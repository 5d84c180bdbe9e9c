import os

import torch
from hypothesis import HealthCheck, settings

# Convolutions are slow to build relative to hypothesis' default deadline; CI runs a fixed sequence.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# The suite runs on pytest-xdist workers (``-n 2``, pyproject.toml): the cores are shared among them, since
# OpenMP threads of two workers on the same cores wait on each other far longer than they compute.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _workers)))
