"""Recycled memory for the attention layer's large tensors (``tcnn_fx.layers.workspace``).

A block may be handed out again only once nothing references it: not a
caller's tensor, not autograd's record of one (including a graph kept with
``retain_graph``), in any thread.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from tcnn_fx import ConvAttention2d
from tcnn_fx.layers import workspace


@pytest.fixture(autouse=True)
def _empty_workspace():
    workspace.release()
    yield
    workspace.release()


def _layer(channels: int = 16, gate: float = 0.2) -> ConvAttention2d:
    torch.manual_seed(0)
    layer = ConvAttention2d.from_conv(nn.Conv2d(channels, channels, 3, padding=1))
    with torch.no_grad():
        layer.gate.fill_(gate)
    return layer


def test_a_block_is_reused_only_once_its_tensor_is_gone():
    like = torch.empty(0)
    first = workspace.empty((4, 8), like)
    second = workspace.empty((4, 8), like)
    assert first.data_ptr() != second.data_ptr()  # the first is still referenced
    pointer = first.data_ptr()
    del first
    third = workspace.empty((8, 4), like)  # same size, another shape
    assert third.data_ptr() == pointer
    view = third[1:]
    del third
    assert workspace.empty((4, 8), like).data_ptr() != pointer  # a view still reads the block
    assert view.shape == (7, 4)


def test_a_block_serves_only_its_dtype_and_size():
    like = torch.empty(0)
    first = workspace.empty((10,), like)
    pointer = first.data_ptr()
    del first  # free, but of another dtype or size than the requests below
    double = workspace.empty((10,), torch.empty(0, dtype=torch.float64))
    bigger = workspace.empty((11,), like)
    assert double.dtype == torch.float64 and double.data_ptr() != pointer
    assert bigger.numel() == 11 and bigger.data_ptr() != pointer


def test_a_free_block_serves_smaller_requests_down_to_half_its_size():
    like = torch.empty(0)
    block = workspace.empty((20,), like)
    pointer = block.data_ptr()
    del block
    smaller = workspace.empty((3, 4), like)  # 12 of the 20
    assert smaller.data_ptr() == pointer and smaller.is_contiguous() and smaller.shape == (3, 4)
    del smaller
    assert workspace.empty((9,), like).data_ptr() != pointer  # under half: a block of its own


def test_free_blocks_beyond_the_retained_bytes_are_released(monkeypatch):
    monkeypatch.setattr(workspace, "RETAIN_BYTES", 4096)
    like = torch.empty(0)
    for size in range(100, 130):  # 30 shapes, each freed at once
        workspace.empty((size,), like)
    assert workspace.held_bytes() <= 4096 + 130 * 4
    busy = [workspace.empty((1000,), like) for _ in range(3)]  # 12 KB in use stay held
    assert workspace.held_bytes() >= 3 * 4000
    del busy
    workspace.release()
    assert workspace.held_bytes() == 0


def test_free_blocks_beyond_the_retained_count_are_released(monkeypatch):
    monkeypatch.setattr(workspace, "RETAIN_BLOCKS", 4)
    like = torch.empty(0)
    for size in range(10, 400, 13):  # 30 growing sizes: no free block can serve the next
        workspace.empty((size * size,), like)
    assert len(workspace._blocks) <= 4 + 1


def test_requests_larger_than_the_retained_bytes_are_fresh(monkeypatch):
    monkeypatch.setattr(workspace, "RETAIN_BYTES", 1024)
    tensor = workspace.empty((1000,), torch.empty(0))
    assert tensor.shape == (1000,) and workspace.held_bytes() == 0


def test_tensors_under_capture_or_wrapped_are_not_recycled():
    def grab(x):
        workspace.empty((3,), x)
        return x + 1

    torch.func.vmap(grab)(torch.ones(2, 3))
    torch.fx.experimental.proxy_tensor.make_fx(grab)(torch.ones(3))
    assert workspace.held_bytes() == 0


def test_a_block_made_in_inference_mode_serves_training():
    layer = _layer()
    x = torch.randn(2, 16, 6, 6)
    with torch.inference_mode():
        layer(x)
    assert workspace.held_bytes() > 0
    layer(x).sum().backward()  # writes into the same blocks outside inference mode
    assert layer.gate.grad is not None


def test_repeated_inference_allocates_no_new_blocks():
    layer = _layer().eval()
    x = torch.randn(3, 16, 8, 8)
    with torch.no_grad():
        first = layer(x)
        held = workspace.held_bytes()
        blocks = len(workspace._blocks)
        for _ in range(3):
            assert torch.equal(layer(x), first)
    assert held > 0 and workspace.held_bytes() == held and len(workspace._blocks) == blocks


def test_retained_graph_keeps_its_maps_through_later_steps():
    """A graph kept for a second backward keeps its blocks: other steps in between cannot overwrite them."""
    layer = _layer()
    x, other = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    loss = layer(x).square().sum()
    loss.backward(retain_graph=True)
    expected = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    for _ in range(2):  # other steps reuse every free block
        layer(other).square().sum().backward()
    layer.zero_grad()
    loss.backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_threads_running_layers_at_once_get_their_own_blocks():
    layer = _layer().eval()
    inputs = [torch.randn(4, 16, 8, 8) for _ in range(4)]
    with torch.no_grad():
        expected = [layer(x) for x in inputs]
    results: dict[int, list] = {}

    def run(index: int) -> None:
        with torch.no_grad():
            results[index] = [layer(inputs[(index + i) % 4]) for i in range(20)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, outputs in results.items():
        for i, out in enumerate(outputs):
            assert torch.equal(out, expected[(index + i) % 4])
