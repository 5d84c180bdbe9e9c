"""Where ``ConvAttention2d`` computes its attention, chosen once per call by ``choose``.

The layer keeps its parameters and the reference math; this module holds
the ways of running the attention core and the one rule that picks among
them:

* ``KERNEL``: the compiled attention-and-gather kernel, the operator
  ``tcnn_fx::attend_gather`` (``native``), for float32 CPU inference where
  it is enabled and could be built;
* ``ONEDNN``: composed operators with the gather as oneDNN grouped
  convolutions, for eager float32 CPU inference with at least 128 channels
  where PyTorch dispatches to AVX-512 (elsewhere ``torch.bmm`` was faster);
* ``TRAINING``: the operator ``tcnn_fx::attend_gather_training``
  (``attention_backward``) under autograd in float32 or float64 without
  autocast (the composed forward, a leaner backward);
* ``COMPOSED``: PyTorch operators and ``torch.bmm`` for everything else:
  half precision, autocast, GPU inference, and graphs captured for use
  outside PyTorch; in eager float32 CPU inference the content scores,
  softmax and mix are one pass of the maps kernel (``native_maps``) where
  it is used, as they are in ``TRAINING``'s forward, and from 64 keys the
  same pass gathers too (``native_maps.content_mix_gather``).

In eager float32 CPU inference every backend but ``TRAINING`` hands its
gathered taps to the projection kernel (``native_projection``) where it is
used and has reproduced the layer's strided convolution for taps of that
shape.

How each kind of capture runs the layer:

* ``torch.compile`` (TorchDynamo tracing for a compiled callable): as eager
  code would, ``KERNEL`` and ``TRAINING`` included, because both are
  registered operators with fake implementations, which the compiler keeps
  as single calls: ``TRAINING`` puts one call per layer in the forward graph
  and one (the hand-written backward) in the backward graph, ``KERNEL`` one
  per layer and chunk of ``INFERENCE_IMAGES`` images, as in eager code.
  ``ONEDNN`` becomes ``COMPOSED``: its grouped convolutions, one group per
  image, are a layout chosen for eager oneDNN calls; the compiler plans the
  composed gather itself.
* ``torch.export`` (strict, through TorchDynamo, or non-strict, under a fake
  tensor mode), hence ``torch.onnx.export`` (which exports through
  ``torch.export``, or traces with ``torch.jit.trace``), ``torch.jit.trace``,
  ``torch.fx`` symbolic tracing and ``make_fx`` (a dispatch mode): always
  ``COMPOSED``.  Their graphs leave PyTorch, and the ONNX exporter (like any
  consumer without this package) cannot translate ``tcnn_fx`` operators, so
  exported graphs must hold PyTorch's own operators only; those graphs must
  not fix the batch size either (the chunked inference backends would).

Every backend computes the same function (tested against each other and
against the convolution at initialisation).  The measurements behind the
choices are in docs/conv_attention.md ("Efficiency").
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from tcnn_fx.layers import native

#: Images per call in CPU inference with ``KERNEL`` or ``ONEDNN`` (larger batches run in chunks of this many).
INFERENCE_IMAGES = 8
#: The compiled kernel's softmax is base 2: queries are scaled by log2(e) to compensate.
LOG2_E = math.log2(math.e)
#: The fewest channels at which the oneDNN gather is chosen.
ONEDNN_CHANNELS = 128
#: The SIMD levels (``torch.backends.cpu.get_cpu_capability()``) where the layer's products run on oneDNN (the
#: gather as grouped convolutions, queries and keys as a 1x1 convolution) rather than on the BLAS: where oneDNN
#: was measured the faster (docs/conv_attention.md, "Efficiency").
ONEDNN_CAPABILITIES = ("AVX512",)


class Backend(enum.Enum):
    KERNEL = "kernel"
    ONEDNN = "onednn"
    TRAINING = "training"
    COMPOSED = "composed"

    @property
    def chunks(self) -> bool:
        """Whether the backend runs a large batch a few images at a time (``INFERENCE_IMAGES``)."""
        return self in (Backend.KERNEL, Backend.ONEDNN)


def capturing() -> bool:
    """Whether the forward pass is being traced, exported or compiled rather than run (nothing may be cached)."""
    return (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or is_fx_symbolic_tracing()
        or is_in_torch_dispatch_mode()
    )


def exporting() -> bool:
    """Whether the forward pass is being captured into a graph that must hold PyTorch's own operators only.

    Every capture but ``torch.compile``'s: under TorchDynamo only a strict
    ``torch.export``; otherwise any capture ``capturing`` detects (non-strict
    export runs the module under a fake tensor mode, with the compiling flag
    set).
    """
    if torch.compiler.is_dynamo_compiling():
        return torch.compiler.is_exporting()
    return capturing()


def choose(x: Tensor) -> Backend:
    """The backend for a forward pass on ``x`` (``(B, C, H, W)``) in the current autograd and capture state."""
    if exporting():
        return Backend.COMPOSED
    if torch.is_grad_enabled():
        trainable = x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type)
        return Backend.TRAINING if trainable else Backend.COMPOSED
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[0] == 0:
        return Backend.COMPOSED
    if native.available():
        return Backend.KERNEL
    if capturing():  # torch.compile: the oneDNN layout is for eager calls
        return Backend.COMPOSED
    if x.shape[1] >= ONEDNN_CHANNELS and onednn_faster():
        return Backend.ONEDNN
    return Backend.COMPOSED


def onednn_faster() -> bool:
    """Whether oneDNN is usable and, at this SIMD level, measured faster than the BLAS for the layer's products."""
    usable = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return usable and torch.backends.cpu.get_cpu_capability() in ONEDNN_CAPABILITIES


def gather_bmm(values: Tensor, maps: Tensor, out: Tensor | None = None) -> Tensor:
    """Every head's attention applied to every input channel: ``(B, C, heads, queries)``, into ``out`` if given.

    ``values`` is ``(B, C, rows, columns)``, ``maps`` ``(B, heads, queries, keys)``, ``out`` (contiguous)
    ``(B, C, heads * queries)``.
    """
    batch, channels = values.shape[:2]
    heads, queries, keys = maps.shape[1:]
    gathered = torch.bmm(values.reshape(batch, channels, keys), maps.reshape(batch, heads * queries, keys).mT, out=out)
    return gathered.reshape(batch, channels, heads, queries)


def gather_onednn(values: Tensor, maps: Tensor) -> Tensor:
    """``gather_bmm``'s product as a oneDNN grouped 1x1 convolution: ``(1, C, B * heads, queries)``.

    One group per image: pixels are the C channels, input channels the keys
    (channels-last, so the values need no copy beyond images-inner order),
    output channels the heads' queries, weights the maps themselves.  The
    images end up along the rows.
    """
    batch, channels = values.shape[:2]
    heads, queries, keys = maps.shape[1:]
    # (Strides of the size-1 dimensions as permute leaves them: oneDNN takes other, equally valid
    # channels-last strides for a different layout and runs much slower.)
    pixels = values.reshape(batch, channels, keys).transpose(0, 1).reshape(1, channels, 1, batch * keys)
    gathered = F.conv2d(pixels.permute(0, 3, 1, 2), maps.reshape(batch * heads * queries, keys, 1, 1), groups=batch)
    return gathered.permute(0, 2, 3, 1).reshape(1, channels, batch * heads, queries)
