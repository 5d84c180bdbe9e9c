import os

import torch
from hypothesis import HealthCheck, settings

# Convolutions are slow to build relative to hypothesis' default deadline; CI runs a fixed sequence.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
