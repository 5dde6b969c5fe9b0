"""3-D convolution for the network: oneDNN called directly, channels-last output, faster weight gradients.

Two things PyTorch's own path does slowly on the CPU for the shapes of this network:

* ``F.conv3d`` routes batch-1 volumes with few channels x slices (e.g. 64 channels at 16^3) to
  PyTorch's reference kernel, 2-3x slower than oneDNN, which :func:`conv3d` calls directly.
* oneDNN's weight gradient of a 3x3x3 convolution over a large, thin-channelled volume (16
  channels at 64 x 128 x 128) takes 2.2x the forward pass on two AVX2 cores. The same gradient
  computed over a *batch of slabs* (the volume cut into 8-slice slabs along z, each with its
  one-slice halo, stacked along the batch axis) takes 1.3-1.4x: oneDNN parallelises and blocks
  that shape better. The weight gradient is a sum over output voxels, so the slabs add up to the
  same gradient (float32 rounding differs, ~1e-5 relative). Which of the two is faster depends
  on oneDNN's kernel choice on the machine, so the first backward pass of each shape times both
  and keeps the faster (like ``cudnn.benchmark``); :data:`WEIGHT_GRAD_CHOICES` records the
  choices.
"""

from __future__ import annotations

import itertools
import time

import torch
import torch.nn.functional as F

_MKLDNN_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.aten, "mkldnn_convolution")
_CL = torch.channels_last_3d

SLAB = 8  # slices per slab of the slab weight gradient
_SLAB_GROUP_BYTES = 32 << 20  # at most this much of slab copies at a time (bounds the extra memory)
_SLAB_MIN_VOXELS = 1 << 16  # below this per sample, the plain gradient is as fast

#: ``(B, C_in, C_out, Z, Y, X) -> "slabs" | "onednn"``: the weight-gradient method chosen per shape.
WEIGHT_GRAD_CHOICES: dict[tuple[int, ...], str] = {}


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_MKLDNN_CONV and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.compiler.is_compiling())  # the compiler lowers its own


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: int = 0,
           stride: int | tuple[int, int, int] = 1) -> torch.Tensor:
    """3-D convolution whose output is channels-last (oneDNN directly on CPU in float32)."""
    s = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    if not _onednn_ok(x, weight):
        return F.conv3d(x, weight, bias, stride=s, padding=padding).contiguous(memory_format=_CL)
    if (torch.is_grad_enabled() and weight.requires_grad and s == (1, 1, 1) and padding == 1
            and tuple(weight.shape[2:]) == (3, 3, 3) and _slab_shape_ok(x)):
        return _Conv3x3x3.apply(x, weight, bias)
    out = torch.ops.aten.mkldnn_convolution(x, weight, bias, [padding] * 3, list(s), [1, 1, 1], 1)
    return out.contiguous(memory_format=_CL)


def _slab_shape_ok(x: torch.Tensor) -> bool:
    z, y, w = x.shape[2:]
    return z % SLAB == 0 and z >= 2 * SLAB and z * y * w >= _SLAB_MIN_VOXELS


def _backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, padding: list[int],
              want_input: bool) -> torch.Tensor:
    """oneDNN's input gradient (``want_input``) or weight gradient of a stride-1 convolution."""
    mask = [want_input, not want_input, False]
    out = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1, 1], padding, [1, 1, 1], False,
                                              [0, 0, 0], 1, mask)
    return out[0] if want_input else out[1]


def _onednn_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _backward(grad, x, weight, [1, 1, 1], want_input=False)


def slab_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, slab: int = SLAB,
                     group_bytes: int = _SLAB_GROUP_BYTES) -> torch.Tensor:
    """Weight gradient of a 3x3x3, stride-1, padding-1 convolution, computed over batches of z-slabs.

    ``x`` and ``grad`` are ``(B, C, Z, Y, X)`` channels-last with ``Z`` divisible by ``slab``.
    Each slab of ``grad`` (a view) is paired with a copy of its ``slab + 2`` input slices (zeros
    beyond the volume) and the convolution's weight gradient is taken with no z padding; groups of
    slabs of at most ``group_bytes`` of copies go through oneDNN as one batch.
    """
    b, c, z, y, w = x.shape
    xt, gt = x.permute(0, 2, 3, 4, 1), grad.permute(0, 2, 3, 4, 1)  # (B, Z, Y, X, C) views
    slabs = z // slab
    # groups of equal size, at least two slabs each: oneDNN is slow on a batch of one thin slab
    per = max(2, group_bytes // ((slab + 2) * y * w * c * x.element_size()))
    groups = max(1, slabs // per)
    bounds = [round(i * slabs / groups) for i in range(groups + 1)]
    total = None
    for s in range(b):
        for i0, i1 in itertools.pairwise(bounds):
            k, z0, z1 = i1 - i0, i0 * slab, i1 * slab
            xs = x.new_empty(k, slab + 2, y, w, c)
            xs[:, 1:slab + 1] = xt[s, z0:z1].view(k, slab, y, w, c)
            xs[1:, 0] = xt[s, z0 + slab - 1:z1 - 1:slab]  # lower halo of every slab but the first
            xs[:-1, slab + 1] = xt[s, z0 + slab:z1:slab]  # upper halo of every slab but the last
            if z0 > 0:
                xs[0, 0] = xt[s, z0 - 1]
            else:
                xs[0, 0].zero_()
            if z1 < z:
                xs[-1, slab + 1] = xt[s, z1]
            else:
                xs[-1, slab + 1].zero_()
            gs = gt[s, z0:z1].reshape(k, slab, y, w, grad.shape[1]).permute(0, 4, 1, 2, 3)
            part = _backward(gs, xs.permute(0, 4, 1, 2, 3), weight, [0, 1, 1], want_input=False)
            total = part if total is None else total.add_(part)
    return total


def _timed(fn) -> tuple[float, torch.Tensor]:
    fn()  # oneDNN creates its primitive for a new shape on the first call
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    key = (x.shape[0], x.shape[1], weight.shape[0], *x.shape[2:])
    choice = WEIGHT_GRAD_CHOICES.get(key)
    if choice is None:
        t_onednn, onednn = _timed(lambda: _onednn_weight_grad(grad, x, weight))
        t_slabs, slabs = _timed(lambda: slab_weight_grad(grad, x, weight))
        choice = WEIGHT_GRAD_CHOICES[key] = "slabs" if t_slabs < 0.9 * t_onednn else "onednn"
        return slabs if choice == "slabs" else onednn
    return slab_weight_grad(grad, x, weight) if choice == "slabs" else _onednn_weight_grad(grad, x, weight)


class _Conv3x3x3(torch.autograd.Function):
    """oneDNN 3x3x3 convolution (stride 1, padding 1) with the weight gradient of :func:`_weight_grad`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        x = x.contiguous(memory_format=_CL)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = torch.ops.aten.mkldnn_convolution(x, weight, bias, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1)
        return out.contiguous(memory_format=_CL)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=_CL)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _backward(grad, x, weight, [1, 1, 1], want_input=True)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad, x, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, 2, 3, 4))
        return grad_x, grad_w, grad_b
