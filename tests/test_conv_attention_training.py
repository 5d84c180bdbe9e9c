"""The layer is trainable: the content branch starts silent yet learns, and every attention parameter gets gradient."""

import torch
from torch import nn

from tcnn_fx import ConvAttention2d, ConvAttentionConfig


def classifier(layer: nn.Module) -> nn.Module:
    return nn.Sequential(layer, nn.BatchNorm2d(layer.out_channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(layer.out_channels, 4))


def task(seed: int = 0):
    """A small real task: tell apart four oriented patterns in noise, which needs non-local evidence."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(64) % 4
    images = torch.randn(64, 6, 10, 10, generator=generator) * 0.5
    for k in range(4):
        pattern = torch.zeros(10, 10)
        if k == 0:
            pattern[::3] = 1
        elif k == 1:
            pattern[:, ::3] = 1
        elif k == 2:
            pattern.fill_diagonal_(1)
        else:
            pattern = pattern.fill_diagonal_(1).flip(0)
        images[labels == k, :3] += pattern
    return images, labels


def test_content_branch_is_silent_at_init_and_learns():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    layer = ConvAttention2d.from_conv(conv)
    model = classifier(layer)
    images, labels = task()
    with torch.no_grad():
        reference = conv(images)
        assert torch.equal(layer.content_weight(), torch.zeros(layer.num_heads))
        assert ((layer(images) - reference).abs().max() / reference.abs().max()) <= 1e-6

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = {}
    for step in range(6):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        for name in ("gate", "query_weight", "key_weight", "centres", "locality"):
            grad = getattr(layer, name).grad
            history.setdefault(name, []).append(0.0 if grad is None else grad.abs().max().item())
        optimiser.step()

    # The gate is the only content parameter with gradient at the first step: content attention is
    # multiplied by it.  Once it has moved, the query and key weights learn (no saddle at zero).
    assert history["gate"][0] > 0
    assert history["query_weight"][0] == 0 and history["key_weight"][0] == 0
    assert min(history["query_weight"][1:]) > 0 and min(history["key_weight"][1:]) > 0
    # The positional parameters receive gradient from the start, small while the maps are one-hot.
    assert min(history["centres"]) > 0 and min(history["locality"]) > 0
    assert layer.gate.abs().min() > 0
    with torch.no_grad():
        departure = (layer(images) - conv(images)).abs().max() / conv(images).abs().max()
    assert departure > 1e-3


def test_convit_parameterisation_trains_positional_maps_visibly():
    torch.manual_seed(0)
    layer = ConvAttention2d.from_conv(nn.Conv2d(6, 8, 3, padding=1), ConvAttentionConfig.convit())
    model = classifier(layer)
    images, labels = task()
    before = layer.locality.detach().clone(), layer.centres.detach().clone()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimiser.step()
    assert (layer.locality - before[0]).abs().max() > 1e-4
    assert (layer.centres - before[1]).abs().max() > 1e-4


def test_loss_decreases_when_fine_tuning_the_hybrid():
    torch.manual_seed(0)
    model = classifier(ConvAttention2d.from_conv(nn.Conv2d(6, 8, 3, padding=1)))
    images, labels = task()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
