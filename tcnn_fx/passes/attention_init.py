"""Structured initialisation of a Vision Transformer's attention: impulse (convolutional) and mimetic.

``impulse_init`` (Zheng, Li & Lucey, arXiv 2404.01139): every head gets an
offset inside a K x K window, and its query/key weights are solved so that,
on the model's positional embeddings, the head's attention is that offset's
shift matrix (a one-hot "impulse" convolution filter).  First in closed form::

    X     = layer_norm(positional embeddings of the grid tokens)     (N, D)
    L_h   = target logits of head h                                   (N, N)
    A_h   = pinv(X) @ L_h @ pinv(X).T / scale                         (D, D)
    A_h  ~= Wq_h.T @ Wk_h    (rank head_dim: truncated SVD, sqrt(S) to each side)

so that ``X Wq_h.T (X Wk_h.T).T * scale ~= L_h``; ``X`` is what a pre-norm
block's attention sees of a token that is its position only.  Then refined:
the closed form fits logits linearly, which a rank-``head_dim`` product
cannot do for a full-rank shift once the grid has more tokens than
``head_dim``; the softmax only needs the target to win, so ``refine_steps``
Adam steps (default 100) minimise the cross-entropy of each head's target
token, with the prefix tokens (class, registers) among the keys.  The paper
fits by gradient descent from random weights (10,000 steps); from the closed
form, 100 steps suffice.

Targets: ``'onehot'`` (default, the paper's shift matrix: logit ``strength``
= 16 on the target, 0 elsewhere; small weights) and ``'distance'``
(``-strength * ||p_j - (p_i + offset)||^2`` with strength 4: rank <= 4, so the
truncation loses nothing, for smooth sinusoidal embeddings where one-hot
logits cannot be expressed; large weights).  ``rcond`` (1e-3) cuts small
singular values of ``X``: sinusoidal tables are numerically rank-deficient,
and an unregularised pseudo-inverse gives weights of norm 1e6-1e13.

Inside the model a token is patch content plus position, and timm and
torchvision draw positions with standard deviation 0.02 against patch tokens
of RMS about 0.6: the content drowns the positions.  ``scale_positions`` (or
``position_scale=``) rescales the positional embedding to a multiple of the
patch tokens' RMS; ``measure_target_mass`` measures how convolutional the
heads are inside the model on real images.  docs/vit.md has the figures.

``mimetic_init`` (Trockman & Kolter, ICML 2023): per head
``Wq.T Wk ~= a1 Z1 + b1 I`` and for the layer ``Wv.T Wo.T ~= a2 Z2 - b2 I``
(``Z`` uniform with variance 1/D; the paper's a1 = b1 = 0.7, a2 = b2 = 0.4),
each product factored by SVD.  It needs no positions, so it also applies to
the content branch of ``ConvAttention2d`` (queries and keys only).

Both passes copy the model unless ``inplace=True`` and return it with a
report.  Query and key biases are set to zero (they would shift every score).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.modes import evaluating
from tcnn_fx.tokens import (
    AttentionSite,
    AttentionWeights,
    TokenGrid,
    TokenModelError,
    find_attention_sites,
    find_patch_stem,
    find_token_grid,
    grid_points,
    select_attention,
)

#: Default target strengths (logit scale) per target kind; see the module docstring.
DEFAULT_STRENGTH = {"onehot": 16.0, "distance": 4.0}


@dataclass(frozen=True)
class LayerInit:
    """What a pass did to one attention layer.

    ``offsets`` (impulse only): each head's target offset ``(dy, dx)`` in tokens.
    ``position_mass`` (impulse only): each head's mean attention mass on its
    target token, over grid queries whose target is inside the grid, with the
    positional embeddings alone as input.
    """

    name: str
    kind: str
    offsets: tuple[tuple[int, int], ...] = ()
    position_mass: tuple[float, ...] = ()
    value_output: bool = False


@dataclass(frozen=True)
class AttentionInitReport:
    """The layers a pass initialised, how, and the settings used (for replay and for the docs)."""

    method: str
    layers: tuple[LayerInit, ...]
    settings: dict = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{self.method} init of {len(self.layers)} attention layers {self.settings}"]
        for layer in self.layers:
            line = f"  {layer.name:<28} {layer.kind:<15}"
            if layer.position_mass:
                mass = sum(layer.position_mass) / len(layer.position_mass)
                line += f" offsets {list(layer.offsets)}  target mass (positions alone) {mass:.3f}"
            if layer.value_output:
                line += " value/output set"
            lines.append(line)
        return "\n".join(lines)


# The impulse solve


def window_offsets(kernel_size: int) -> list[tuple[int, int]]:
    """The offsets of a ``kernel_size`` x ``kernel_size`` window, row-major."""
    half = kernel_size // 2
    return [(dy, dx) for dy in range(-half, half + 1) for dx in range(-half, half + 1)]


def target_logits(grid_size: tuple[int, int], offset: tuple[int, int], target: str, strength: float) -> Tensor:
    """The ``(N, N)`` logit matrix whose softmax is (near) the shift matrix of ``offset``, row-centred."""
    points = grid_points(grid_size).double()
    wanted = points + torch.tensor(offset, dtype=torch.float64)
    if target == "distance":
        logits = -strength * (points[None, :, :] - wanted[:, None, :]).square().sum(-1)
    elif target == "onehot":
        logits = strength * (points[None, :, :] == wanted[:, None, :]).all(-1).double()
    else:
        raise InvalidInputError(f"target must be 'distance' or 'onehot', not {target!r}")
    return logits - logits.mean(dim=1, keepdim=True)


def normalised_tokens(grid: TokenGrid) -> Tensor:
    """Prefix tokens, then grid positions, as a pre-norm block sees them: layer-normalised without affine, float64.

    The grid rows are what the solve fits; the prefix rows (a class token is a
    key for every query) take part in the refinement and the reported mass.
    """
    tokens = torch.cat([grid.prefix_tokens, grid.positions]).double()
    return F.layer_norm(tokens, tokens.shape[-1:])


def low_rank_factors(product: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(left, right)``, each ``(rank, D)``, with ``left.T @ right`` the best rank-``rank`` approximation of ``product``."""
    u, s, vh = torch.linalg.svd(product)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).T, vh[:rank] * root[:, None]


def solve_impulse_head(
    pinv: Tensor, grid_size, offset, *, target: str, strength: float, rank: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Query and key rows ``(rank, D)`` of one head whose attention on the positions (``pinv`` is their
    pseudo-inverse) approximates ``offset``'s shift."""
    logits = target_logits(grid_size, offset, target, strength)
    return low_rank_factors(pinv @ logits @ pinv.T / scale, rank)


def refine_heads(
    tokens: Tensor, grid: TokenGrid, offsets, query: Tensor, key: Tensor, scale: float, *, steps: int, lr: float
) -> tuple[Tensor, Tensor]:
    """Per-head query and key rows ``(heads, rank, D)`` after ``steps`` Adam steps from the closed form.

    The loss is the paper's gradient fit made a classification: the
    cross-entropy of each head's target token, for grid queries whose target
    is in the grid, over every key including the prefix tokens
    (``normalised_tokens``).  The closed form fits *logits* linearly, which a
    rank-``head_dim`` product cannot do for a full-rank shift; the softmax
    only needs the target to win, which it can.
    """
    if steps == 0:
        return query, key
    index, valid = (torch.stack(parts) for parts in zip(*(grid.target_index(o) for o in offsets), strict=True))
    keys = tokens.float()
    queries = keys[grid.prefix :]
    q, k = (t.detach().float().clone().requires_grad_() for t in (query, key))
    size = torch.cat([q.detach().flatten(), k.detach().flatten()]).square().mean().sqrt()
    optimizer = torch.optim.Adam([q, k], lr=lr * float(size))  # Adam's steps are absolute: relative to the weights
    with torch.enable_grad():
        for _ in range(steps):
            logits = (queries @ q.mT) @ (keys @ k.mT).mT * scale
            picked = logits.log_softmax(-1).gather(2, grid.prefix + index[..., None]).squeeze(2)
            loss = -picked[valid].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return q.detach().double(), k.detach().double()


def target_mass(maps: Tensor, grid: TokenGrid, offsets: list[tuple[int, int]]) -> list[float]:
    """Per head, the mean attention mass on its target token over grid queries whose target is in the grid.

    ``maps`` is ``(batch, heads, L, L)`` over the whole sequence, ``grid.prefix`` tokens first.
    """
    if maps.shape[-1] != grid.prefix + len(grid.positions):
        raise InvalidInputError(
            f"attention over {maps.shape[-1]} tokens, but the grid {grid.grid_size} with {grid.prefix} prefix tokens "
            f"makes {grid.prefix + len(grid.positions)}: the images are not of the size the model was initialised for"
        )
    masses = []
    for head, offset in enumerate(offsets):
        index, valid = grid.target_index(offset)
        queries = torch.arange(valid.numel())
        mass = maps[:, head, grid.prefix + queries[valid], grid.prefix + index[valid]]
        masses.append(float(mass.mean()))
    return masses


def _copy(model: nn.Module, inplace: bool) -> nn.Module:
    return model if inplace else copy.deepcopy(model)


def _sites(model: nn.Module, policy) -> list[AttentionSite]:
    sites = find_attention_sites(model)
    chosen = select_attention(sites, policy)
    if not chosen and policy != "none":  # "none" asks for nothing
        layers = [f"{s.name} (depth {s.index})" for s in sites]
        raise TokenModelError(f"policy {policy!r} selects no attention layer; the layers are {layers}")
    return chosen


def impulse_init(
    model: nn.Module,
    example_inputs: tuple,
    *,
    policy="all",
    kernel_size: int = 3,
    order: str = "random",
    target: str = "onehot",
    strength: float | None = None,
    rcond: float = 1e-3,
    refine_steps: int = 100,
    refine_lr: float = 0.02,
    position_scale: float | None = None,
    seed: int = 0,
    inplace: bool = False,
) -> tuple[nn.Module, AttentionInitReport]:
    """Initialise the chosen attention layers' queries and keys as impulse (shift) filters; see the module docstring.

    ``order``: ``'random'`` draws each head's offset uniformly from the window
    (independently per layer, from ``seed``), as the paper does; ``'fixed'``
    walks the window row-major, head ``h`` taking offset ``h mod K^2``.
    ``example_inputs`` fixes the token grid (the model's input size) and, with
    ``position_scale``, the patch-token RMS the positional embedding is scaled to.
    ``refine_steps`` Adam steps follow the closed form, with a learning rate of
    ``refine_lr`` times the RMS of the closed-form weights; 0 keeps the closed
    form as it is.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InvalidInputError(f"kernel_size must be odd (3 or 5 in the paper), not {kernel_size}")
    if order not in ("random", "fixed"):
        raise InvalidInputError(f"order must be 'random' or 'fixed', not {order!r}")
    strength = DEFAULT_STRENGTH.get(target) if strength is None else strength
    if strength is None or strength <= 0:
        raise InvalidInputError(f"target must be one of {sorted(DEFAULT_STRENGTH)} with a positive strength")
    if refine_steps < 0 or refine_lr <= 0:
        raise InvalidInputError(f"refine_steps must be >= 0 and refine_lr > 0, not {refine_steps} and {refine_lr}")
    model = _copy(model, inplace)
    if position_scale is not None:
        scale_positions(model, example_inputs, position_scale, inplace=True)
    grid = find_token_grid(model, example_inputs)
    if kernel_size > min(grid.grid_size):
        raise InvalidInputError(f"kernel_size {kernel_size} is larger than the {grid.grid_size} token grid")
    sites = _sites(model, policy)
    unusable = [s.name for s in sites if s.kind == "conv_attention"]
    if unusable:
        raise TokenModelError(
            f"ConvAttention2d layers {unusable} have no positional embedding in their content branch (its keys are "
            "pixels); their positional branch already is the impulse structure. Use mimetic_init for their content "
            "branch, or a policy that leaves them out"
        )
    tokens = normalised_tokens(grid)
    pinv = torch.linalg.pinv(tokens[grid.prefix :], rtol=rcond)
    window = window_offsets(kernel_size)
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    layers = []
    for site in sites:
        if order == "random":
            picks = torch.randint(len(window), (site.num_heads,), generator=generator).tolist()
        else:
            picks = [h % len(window) for h in range(site.num_heads)]
        offsets = [window[p] for p in picks]
        heads = [
            solve_impulse_head(pinv, grid.grid_size, o, target=target, strength=strength, rank=site.head_dim,
                               scale=site.scale)
            for o in offsets
        ]  # fmt: skip
        query, key = torch.stack([q for q, _ in heads]), torch.stack([k for _, k in heads])
        query, key = refine_heads(tokens, grid, offsets, query, key, site.scale, steps=refine_steps, lr=refine_lr)
        weights = AttentionWeights(site, modules[site.name])
        weights.set_query_key(query.to(weights.dtype), key.to(weights.dtype))
        with torch.no_grad():
            maps = weights.maps(tokens.to(weights.dtype)[None])
        mass = target_mass(maps, grid, offsets)
        layers.append(LayerInit(site.name, site.kind, tuple(offsets), tuple(mass)))
    settings = {
        "kernel_size": kernel_size, "order": order, "target": target, "strength": strength, "rcond": rcond,
        "refine_steps": refine_steps, "refine_lr": refine_lr, "seed": seed, "position_scale": position_scale,
        "grid": list(grid.grid_size), "prefix": grid.prefix, "positions": grid.parameter,
    }  # fmt: skip
    return model, AttentionInitReport("impulse", tuple(layers), settings)


@torch.no_grad()
def scale_positions(
    model: nn.Module, example_inputs: tuple, scale: float, *, inplace: bool = False
) -> tuple[nn.Module, float]:
    """Rescale the positional embedding (all rows) to ``scale`` times the RMS of the patch tokens.

    The patch tokens are the stem's output on ``example_inputs``.  Returns the
    model and the factor applied.  On its own it is the control for
    ``impulse_init(position_scale=...)``: the same positions, without the solve.
    """
    if scale <= 0:
        raise InvalidInputError(f"position scale must be positive, not {scale}")
    model = _copy(model, inplace)
    grid = find_token_grid(model, example_inputs)
    stem = model.get_submodule(find_patch_stem(model, example_inputs).name)
    with evaluating(stem):  # a conv stem's batch norms must not learn from the example
        patches = stem(example_inputs[0])
    owner, _, attribute = grid.parameter.rpartition(".")
    table = getattr(model.get_submodule(owner), attribute)
    ratio = float(scale * patches.square().mean().sqrt() / table.square().mean().sqrt())
    table.mul_(ratio)
    return model, ratio


# Mimetic


def _identity_plus_noise(dim: int, noise: float, identity: float, generator: torch.Generator) -> Tensor:
    bound = (3.0 / dim) ** 0.5  # uniform with variance 1/dim
    z = (torch.rand(dim, dim, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return noise * z + identity * torch.eye(dim, dtype=torch.float64)


def mimetic_init(
    model: nn.Module,
    *,
    policy="all",
    query_key: tuple[float, float] = (0.7, 0.7),
    value_output: tuple[float, float] = (0.4, 0.4),
    seed: int = 0,
    inplace: bool = False,
) -> tuple[nn.Module, AttentionInitReport]:
    """Mimetic initialisation: ``Wq.T Wk ~= a1 Z + b1 I`` per head, ``Wv.T Wo.T ~= a2 Z - b2 I`` per layer.

    ``query_key = (a1, b1)``, ``value_output = (a2, b2)``: noise and identity
    weights (the paper's defaults).  ``ConvAttention2d`` layers get the
    query/key part only (their values are the convolution's taps).
    """
    model = _copy(model, inplace)
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    layers = []
    for site in _sites(model, policy):
        weights = AttentionWeights(site, modules[site.name])
        dtype = weights.dtype
        heads = [
            low_rank_factors(_identity_plus_noise(site.embed_dim, *query_key, generator), site.head_dim)
            for _ in range(site.num_heads)
        ]
        weights.set_query_key(
            torch.stack([q for q, _ in heads]).to(dtype), torch.stack([k for _, k in heads]).to(dtype)
        )
        if site.has_value:
            noise, identity = value_output
            value, output = low_rank_factors(
                _identity_plus_noise(site.embed_dim, noise, -identity, generator), site.width
            )
            weights.set_value_output(value.to(dtype), output.T.to(dtype))
        layers.append(LayerInit(site.name, site.kind, value_output=site.has_value))
    settings = {"query_key": list(query_key), "value_output": list(value_output), "seed": seed}
    return model, AttentionInitReport("mimetic", tuple(layers), settings)


# Measurement inside the model


def measure_target_mass(model: nn.Module, report: AttentionInitReport, images: Tensor) -> dict[str, list[float]]:
    """Per layer and head, the attention mass on the head's impulse target inside ``model`` on real ``images``.

    Works on any model with the report's layer names, e.g. the same
    architecture before impulse init (a baseline) or after training.
    """
    if report.method != "impulse":
        raise InvalidInputError(f"a {report.method} report has no target offsets to measure")
    grid = find_token_grid(model, (images,))
    if grid.prefix != report.settings["prefix"] or list(grid.grid_size) != report.settings["grid"]:
        raise InvalidInputError(
            f"the model's tokens ({grid.grid_size} grid, {grid.prefix} prefix) are not those the report was made for "
            f"({report.settings['grid']} grid, {report.settings['prefix']} prefix)"
        )
    sites = {s.name: s for s in find_attention_sites(model)}
    modules = dict(model.named_modules())
    inputs: dict[str, Tensor] = {}

    def recorder(name: str, batch_first: bool):
        def hook(module, args, kwargs):
            tokens = args[0] if args else kwargs["query"] if "query" in kwargs else kwargs["x"]
            inputs[name] = tokens if batch_first else tokens.transpose(0, 1)

        return hook

    handles = []
    for layer in report.layers:
        if layer.name not in sites:
            raise InvalidInputError(f"the model has no attention layer '{layer.name}'; it has {sorted(sites)}")
        module = modules[layer.name]
        batch_first = getattr(module, "batch_first", True)
        handles.append(module.register_forward_pre_hook(recorder(layer.name, batch_first), with_kwargs=True))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    with torch.no_grad():
        for layer in report.layers:
            maps = AttentionWeights(sites[layer.name], modules[layer.name]).maps(inputs[layer.name])
            result[layer.name] = target_mass(maps, grid, list(layer.offsets))
    return result
