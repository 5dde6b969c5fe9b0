"""Two forwards per block: the reference (the official op order in plain PyTorch) and the fast one (kernels).

Every block of the network subclasses :class:`DualForward`. Its ``forward_reference`` is the
readable specification; its ``forward_fast`` computes the same function with the kernels of
:mod:`unetrpp.network.kernels` (fused and re-associated ops, custom autograd, oneDNN calls), and
``tests/network/test_fast_vs_reference.py`` holds the two equal, outputs and gradients, in
training and in eval mode. Which one runs is a per-instance choice, the attribute ``fast``, set at
construction (``UNETRPP(..., fast=False)``) or later with :func:`set_fast`. Editing a
``forward_reference`` changes what a ``fast=False`` model computes; the test then tells whether
the fast path still agrees.

:func:`reference_math` overrides every block's choice for the duration of a ``with`` block
(FLOP counting, ONNX export): the one piece of process-wide state, read only in
:meth:`DualForward.forward`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_FORCE_REFERENCE = False


class DualForward(nn.Module):
    """A module with ``forward_reference`` and ``forward_fast`` (same arguments, same function).

    ``fast`` (set by the subclass constructor) picks which one ``forward`` runs; inside
    :func:`reference_math` it is always the reference.
    """

    fast: bool = True

    def forward(self, *args):
        if self.fast and not _FORCE_REFERENCE:
            return self.forward_fast(*args)
        return self.forward_reference(*args)

    def forward_reference(self, *args):
        raise NotImplementedError

    def forward_fast(self, *args):
        raise NotImplementedError

    def set_fast(self, fast: bool = True) -> DualForward:
        """Switch this block and every block inside it to the fast (True) or reference forward."""
        return set_fast(self, fast)


def set_fast(module: nn.Module, fast: bool = True):
    """Set ``fast`` on every :class:`DualForward` in ``module`` (itself included); returns ``module``."""
    for m in module.modules():
        if isinstance(m, DualForward):
            m.fast = bool(fast)
    return module


def reference_enabled() -> bool:
    """True inside :func:`reference_math` (every block then runs its reference forward)."""
    return _FORCE_REFERENCE


@contextlib.contextmanager
def reference_math(enabled: bool = True) -> Iterator[None]:
    """Run every block with the literal official op order (its ``forward_reference``), whatever its ``fast``.

    The fast path computes the same function (the tests hold the two equal) with fused and
    re-associated kernels: BatchNorm folded into convolutions, closed-form instance norm of the
    1x1 skip, block-diagonal GEMMs in EPA that multiply some zeros. The reference path's
    operations are the ones the paper's multiply-add counts count, and it runs ``F.conv3d`` so
    that ``torch.utils.flop_counter`` sees every convolution. ``enabled=False`` lifts an outer
    override: each block then follows its own ``fast``.
    """
    global _FORCE_REFERENCE
    previous, _FORCE_REFERENCE = _FORCE_REFERENCE, enabled
    try:
        yield
    finally:
        _FORCE_REFERENCE = previous
