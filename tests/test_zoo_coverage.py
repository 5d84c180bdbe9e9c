"""Every model of the zoo (all torchvision image CNNs, detection and segmentation included, and the timm list)
captures on the meta device into a site table whose stages are consistent.  Slow sweeps with real weights and
verification are in benchmarks/coverage.py."""

import warnings

import pytest
import torch

import tcnn_fx
from tcnn_fx.models.zoo import build_on_meta, timm_entries, torchvision_entries
from tcnn_fx.stages import stage_table

pytest.importorskip("timm")

ENTRIES = torchvision_entries() + timm_entries()


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda entry: entry.spec)
def test_captures_into_a_consistent_stage_table(entry):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = entry.target(build_on_meta(entry.spec))
        graph = tcnn_fx.trace(model, (torch.empty(1, 3, entry.input_size, entry.input_size, device="meta"),))
    sites = graph.meta["tcnn_fx.sites"]
    assert sites, f"{entry.spec}: no convolution found"
    assert all((site.stage == 0) == site.stem for site in sites), "stage 0 is the stem, and only the stem"
    table = stage_table(sites)
    areas = [stage.resolution[0] * stage.resolution[1] for stage in table]
    assert areas == sorted(areas, reverse=True), f"resolution grows with the stage: {[s.describe() for s in table]}"
    assert all(stage.modules for stage in table)
