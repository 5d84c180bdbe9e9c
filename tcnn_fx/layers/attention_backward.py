"""The attention core of ``ConvAttention2d`` for training, with its backward written out.

Forward: content scores ``S = q^T k``, ``A = softmax(S)``, the per-head mix
``M = (1 - w) P + w A`` with the positional maps ``P``, and the gather
``G = V M^T`` of every channel by every head.  Autograd through those
operators saves ``S``'s softmax, the mix and its broadcast operands, and its
backward walks the ``(batch, heads, queries, keys)`` maps about ten times
(the mix's backward alone multiplies and reduces them three times, and
copies).  This function saves ``A`` only, rebuilds ``M`` from it, and
derives every gradient from ``dM = dG^T V`` in a few passes:

* ``dV = dG M``;
* ``dw = sum(dM * A) - sum(sum_b(dM) * P)``, where the first sum is also
  the softmax backward's row term ``r = sum_k dM * A``;
* ``dP = (1 - w) sum_b(dM)``;
* ``dS = w A (dM - r)`` (the softmax backward), then ``dq = k dS^T`` and
  ``dk = q dS``, with the per-head ``w`` applied to those small products
  rather than to the maps.

Between the products, composed from PyTorch operators (``_map_gradients``),
the maps are walked four times (``dM * A`` in place of ``dM``, its row
sums, its batch sum, ``- A r`` in place: eight reads and writes); the
compiled kernel of ``native_maps``, where it is used, does the same in
one pass (reads ``dM`` and ``A``, writes ``dS`` over ``dM``), as it does
the forward's scores, softmax and mix, and from ``GATHER_MIN_KEYS`` keys
the gather too (``content_mix_gather``: the mix is never written, only the
softmax the backward keeps).

Both directions are registered with PyTorch as operators
(``torch.library.custom_op``) with fake implementations that state their
outputs' shapes: ``tcnn_fx::attend_gather_training`` (the forward, returning
the gathered channels and the softmax kept for the backward) with this
backward as its autograd formula (``torch.library.register_autograd``), and
``tcnn_fx::attend_gather_training_backward``.  ``torch.compile`` therefore
captures the whole core as one call in the forward graph and one in the
backward graph, running this backward, instead of tracing an autograd
function.  Eager code calls the same two functions from ``AttendGather``,
an autograd function, without the dispatcher: in torch 2.14 a custom
operator's registered formula does not compose with ``torch.func``
transforms (its generated autograd function has no ``setup_context``),
while ``AttendGather`` does.  One forward, one backward, two ways in.

Tested against autograd through the composed operators with
``torch.autograd.gradcheck`` in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tcnn_fx.layers import native_maps, workspace


class AttendGather(torch.autograd.Function):
    """``G = V ((1 - w) P + w softmax(q^T k))^T`` per head; see the module docstring.

    ``q`` ``(B, H, d, Q)``, ``k`` ``(B, H, d, K)`` (queries already scaled),
    ``values`` ``(B, C, K)``, ``positional`` ``(H, Q, K)``, ``weight``
    ``(H,)``.  Returns the gathered channels ``(B, C, H, Q)`` and the content
    attention ``(B, H, Q, K)`` (not differentiable).  Its ``setup_context``
    is also that of the operator's registered autograd formula.
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, values: Tensor, positional: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        return _forward(q, k, values, positional, weight)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, values, positional, weight = inputs
        _, attention = output
        ctx.save_for_backward(q, k, values, positional, weight, attention)
        ctx.mark_non_differentiable(attention)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the (non-differentiable) softmax output

    @staticmethod
    def backward(ctx, grad: Tensor | None, _attention_grad: Tensor | None):
        return _gradients(ctx, grad, _backward)


def _forward(q: Tensor, k: Tensor, values: Tensor, positional: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """The gathered channels ``(B, C, H, Q)`` and the content attention ``(B, H, Q, K)``."""
    batch, channels, keys = values.shape
    heads, queries = positional.shape[:2]
    # The maps and the gathered taps in recycled memory (``workspace``): no page faults for them each step.
    base = _kept(positional, weight)
    fused = native_maps.content_mix_gather(q, k, base, weight, values, keep=True)
    if fused is not None:  # scores, softmax, mix and gather in one pass of the compiled kernel; M never written
        return fused
    fused = native_maps.content_mix(q, k, base, weight, keep=True)
    if fused is not None:  # scores, softmax and mix in one pass of the compiled kernel
        mixed, attention = fused
    else:
        scores, attention = scores_softmax(q, k)
        mixed = _mix(attention, base, weight, out=scores)  # then the scores' memory holds the mix
    gathered = workspace.empty((batch, channels, heads * queries), values)
    torch.bmm(values, mixed.reshape(batch, heads * queries, keys).mT, out=gathered)
    return gathered.reshape(batch, channels, heads, queries), attention


def scores_softmax(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Content scores ``q^T k`` and their softmax, ``(B, H, Q, K)`` each, both in recycled memory where usable.

    ``q`` ``(B, H, d, Q)`` (already scaled), ``k`` ``(B, H, d, K)``; the
    scores' memory is the caller's to reuse (the mix is written over it).
    """
    shape = (*q.shape[:2], q.shape[-1], k.shape[-1])
    scores = torch.matmul(q.transpose(-1, -2), k, out=workspace.empty(shape, q))
    return scores, torch.ops.aten._softmax.out(scores, -1, False, out=workspace.empty(shape, q))


def _backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    values: Tensor,
    positional: Tensor,
    weight: Tensor,
    attention: Tensor,
    needs: list[bool],
) -> list[Tensor]:
    """The gradients of the inputs ``q, k, values, positional, weight`` flagged in ``needs``, in that order."""
    batch, channels, keys = values.shape
    heads, queries = positional.shape[:2]
    flat = grad.reshape(batch, channels, heads * queries)
    grad_values = None
    # The rebuilt mix, then dM over it once dV has used it, in recycled memory; where this backward is itself
    # recorded (a second derivative, torch.func), operators without out= arguments, which autograd refuses.
    recorded = torch.is_grad_enabled()
    buffer = None if recorded else workspace.empty((batch, heads, queries, keys), attention)
    if needs[2]:
        mixed = _mix(attention, _kept(positional, weight), weight, out=buffer)
        grad_values = torch.bmm(flat, mixed.flatten(1, 2))
    if not any(needs[i] for i in (0, 1, 3, 4)):  # dV alone: no dM
        return [grad_values]
    out = None if buffer is None else buffer.view(batch, heads * queries, keys)
    grad_mixed = torch.bmm(flat.mT, values, out=out).reshape(batch, heads, queries, keys)
    maps = native_maps.map_gradients(grad_mixed, attention, positional, weight, needs)
    scores_grad, grad_positional, grad_weight = maps or _map_gradients(grad_mixed, attention, positional, weight, needs)
    grad_q = grad_k = None
    if scores_grad is not None:
        # dS = w A (dM - r); w is per head, so it scales the small products below instead of the maps.
        scale = weight[:, None, None]
        grad_q = torch.matmul(k, scores_grad.transpose(-1, -2)).mul_(scale) if needs[0] else None
        grad_k = torch.matmul(q, scores_grad).mul_(scale) if needs[1] else None
    grads = (grad_q, grad_k, grad_values, grad_positional, grad_weight)
    return [g for g, wanted in zip(grads, needs, strict=True) if wanted]


def _map_gradients(
    grad_mixed: Tensor, attention: Tensor, positional: Tensor, weight: Tensor, needs: list[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``dS / w`` (over ``grad_mixed``), ``dP`` and ``dw`` from ``dM``, each ``None`` where not needed.

    PyTorch operators; ``native_maps.map_gradients`` computes the same in one pass where it is used.
    """
    summed = grad_mixed.sum(0) if needs[3] or needs[4] else None  # sum over the batch, (H, Q, K)
    product = grad_mixed.mul_(attention)  # dM * A, in place of dM (dM itself is not needed again)
    row = product.sum(-1, keepdim=True)  # r: the softmax backward's row term
    grad_positional = summed * (1 - weight)[:, None, None] if needs[3] else None
    grad_weight = None
    if needs[4]:
        grad_weight = row.sum((0, 2, 3)) - (summed * positional).sum((1, 2))
    scores_grad = product.addcmul_(attention, row, value=-1) if needs[0] or needs[1] else None  # A (dM - r)
    return scores_grad, grad_positional, grad_weight


def _gradients(ctx, grad: Tensor | None, backward) -> tuple[Tensor | None, ...]:
    """The five inputs' gradients from ``backward`` (``_backward`` or its operator), ``None`` where not needed."""
    needs = list(ctx.needs_input_grad[:5])
    if grad is None or not any(needs):  # the gathered output did not reach the loss
        return None, None, None, None, None
    grads = iter(backward(grad, *ctx.saved_tensors, needs))
    return tuple(next(grads) if wanted else None for wanted in needs)


_forward_op = torch.library.custom_op("tcnn_fx::attend_gather_training", _forward, mutates_args=())
_backward_op = torch.library.custom_op("tcnn_fx::attend_gather_training_backward", _backward, mutates_args=())


@_forward_op.register_fake
def _(q: Tensor, k: Tensor, values: Tensor, positional: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    batch, channels, keys = values.shape
    heads, queries = positional.shape[:2]
    return values.new_empty((batch, channels, heads, queries)), q.new_empty((batch, heads, queries, keys))


@_backward_op.register_fake
def _(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    values: Tensor,
    positional: Tensor,
    weight: Tensor,
    attention: Tensor,
    needs: list[bool],
) -> list[Tensor]:
    inputs = (q, k, values, positional, weight)
    return [t.new_empty(t.shape) for t, wanted in zip(inputs, needs, strict=True) if wanted]


def _registered_backward(ctx, grad: Tensor | None, _attention_grad: Tensor | None):
    """``AttendGather.backward`` as the operator's formula: through the backward operator, one call in a graph."""
    return _gradients(ctx, grad, torch.ops.tcnn_fx.attend_gather_training_backward.default)


_forward_op.register_autograd(_registered_backward, setup_context=AttendGather.setup_context)


def _kept(positional: Tensor, weight: Tensor) -> Tensor:
    """The positional part of the mix, ``(1 - w) P`` per head: ``(H, Q, K)``."""
    return positional * (1 - weight)[:, None, None]


def _mix(attention: Tensor, base: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """``base + w A`` per head, ``(B, H, Q, K)`` (``base = _kept(P, w)``: the mix ``(1 - w) P + w A``), into
    ``out`` if given."""
    return torch.addcmul(base.unsqueeze(0), attention, weight[:, None, None], out=out)


#: ``ProjectProduct``'s weight gradient sums per-image products while they are at most this many times the
#: gathered taps' size (``outputs / queries``), and contracts over images and queries at once beyond it.
PER_IMAGE_WEIGHT_PRODUCTS = 4


class ProjectProduct(torch.autograd.Function):
    """``weight @ gathered``: every head's output projection, per group, with a backward in recycled memory.

    ``weight`` ``(G, O, P)``, ``gathered`` ``(B, G, P, Q)``.  Autograd's own
    backward of this broadcast product allocates the taps' gradient and a
    per-image weight-gradient product, each as large as the gathered taps,
    afresh every step (page faults on every step with glibc's defaults);
    this one takes both from ``workspace`` where it may.
    """

    @staticmethod
    def forward(weight: Tensor, gathered: Tensor) -> Tensor:
        return torch.matmul(weight, gathered)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, gathered = ctx.saved_tensors
        scratch = not torch.is_grad_enabled() and workspace.usable(grad, gathered)  # out= is not differentiable

        def product(a: Tensor, b: Tensor, shape: tuple[int, ...]) -> Tensor:
            return torch.matmul(a, b, out=workspace.empty(shape, gathered) if scratch else None)

        grad_weight = grad_gathered = None
        if ctx.needs_input_grad[1]:
            grad_gathered = product(weight.mT, grad, gathered.shape)
        if ctx.needs_input_grad[0]:
            outputs, queries = grad.shape[-2:]
            if outputs <= PER_IMAGE_WEIGHT_PRODUCTS * queries:  # per-image products as large as the taps, summed
                grad_weight = product(grad, gathered.mT, (gathered.shape[0], *weight.shape)).sum(0)
            else:  # one contraction over images and queries: no per-image products many times the taps' size
                grad_weight = torch.einsum("bgoq,bgpq->gop", grad, gathered)
        return grad_weight, grad_gathered


def attend_gather(q: Tensor, k: Tensor, values: Tensor, positional: Tensor, weight: Tensor) -> Tensor:
    """The gathered channels ``(B, C, H, Q)``, differentiable with the backward above.

    Under ``torch.compile`` through the operator, so the compiler sees one
    operator rather than an autograd function to trace; otherwise through
    ``AttendGather``.
    """
    if torch.compiler.is_dynamo_compiling():
        return torch.ops.tcnn_fx.attend_gather_training.default(q, k, values, positional, weight)[0]
    return AttendGather.apply(q, k, values, positional, weight)[0]
