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

The maps are walked four times in the backward (``dM * A`` in place of
``dM``, its row sums, its batch sum, ``- A r`` in place) besides the
products.

Tested against autograd through the composed operators with
``torch.autograd.gradcheck`` in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


class AttendGather(torch.autograd.Function):
    """``G = V ((1 - w) P + w softmax(q^T k))^T`` per head; see the module docstring.

    ``q`` ``(B, H, d, Q)``, ``k`` ``(B, H, d, K)`` (queries already scaled),
    ``values`` ``(B, C, K)``, ``positional`` ``(H, Q, K)``, ``weight``
    ``(H,)``.  Returns ``(B, C, H, Q)``.
    """

    @staticmethod
    def forward(q: Tensor, k: Tensor, values: Tensor, positional: Tensor, weight: Tensor) -> Tensor:
        batch, channels, keys = values.shape
        heads, queries = positional.shape[:2]
        scores = torch.matmul(q.transpose(-1, -2), k)  # (B, H, Q, K)
        attention = scores.softmax(dim=-1)
        mixed = _mix(attention, positional, weight, out=scores)  # the scores' memory: one large allocation fewer
        gathered = torch.bmm(values, mixed.reshape(batch, heads * queries, keys).mT)
        return gathered.reshape(batch, channels, heads, queries), attention

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, values, positional, weight = inputs
        _, attention = output
        ctx.save_for_backward(q, k, values, positional, weight, attention)
        ctx.mark_non_differentiable(attention)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the (non-differentiable) softmax output

    @staticmethod
    def backward(ctx, grad: Tensor, _attention_grad: Tensor | None):
        if grad is None:  # the gathered output did not reach the loss
            return None, None, None, None, None
        q, k, values, positional, weight, attention = ctx.saved_tensors
        batch, channels, keys = values.shape
        heads, queries = positional.shape[:2]
        flat = grad.reshape(batch, channels, heads * queries)
        needs = ctx.needs_input_grad
        grad_values, buffer = None, None
        if needs[2]:
            buffer = _mix(attention, positional, weight).reshape(batch, heads * queries, keys)
            grad_values = torch.bmm(flat, buffer)
        # dM, into the rebuilt mix's memory once dV has used it.
        grad_mixed = torch.bmm(flat.mT, values, out=buffer).reshape(batch, heads, queries, keys)
        summed = grad_mixed.sum(0) if needs[3] or needs[4] else None  # sum over the batch, (H, Q, K)
        product = grad_mixed.mul_(attention)  # dM * A, in place of dM (dM itself is not needed again)
        row = product.sum(-1, keepdim=True)  # r: the softmax backward's row term
        grad_positional = summed * (1 - weight)[:, None, None] if needs[3] else None
        grad_weight = None
        if needs[4]:
            grad_weight = row.sum((0, 2, 3)) - (summed * positional).sum((1, 2))
        grad_q = grad_k = None
        if needs[0] or needs[1]:
            # dS = w A (dM - r); w is per head, so it scales the small products below instead of the maps.
            scores_grad = product.addcmul_(attention, row, value=-1)
            scale = weight[:, None, None]
            grad_q = torch.matmul(k, scores_grad.transpose(-1, -2)).mul_(scale) if needs[0] else None
            grad_k = torch.matmul(q, scores_grad).mul_(scale) if needs[1] else None
        return grad_q, grad_k, grad_values, grad_positional, grad_weight


def _mix(attention: Tensor, positional: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """``(1 - w) P + w A`` per head, ``(B, H, Q, K)``, into ``out`` if given."""
    base = (positional * (1 - weight)[:, None, None]).unsqueeze(0)
    return torch.addcmul(base, attention, weight[:, None, None], out=out)


def attend_gather(q: Tensor, k: Tensor, values: Tensor, positional: Tensor, weight: Tensor) -> Tensor:
    """``AttendGather`` applied: the gathered channels ``(B, C, H, Q)``."""
    return AttendGather.apply(q, k, values, positional, weight)[0]
