"""A process-wide switch between the fast kernels and the literal official op order."""

from __future__ import annotations

import contextlib

_REFERENCE = False


def reference_enabled() -> bool:
    return _REFERENCE


@contextlib.contextmanager
def reference_math(enabled: bool = True):
    """Run the network with the literal official op order instead of the fast path.

    The fast path computes the same function (the tests hold the two equal) with fused and
    re-associated kernels: BatchNorm folded into convolutions, closed-form instance norm of the
    1x1 skip, block-diagonal GEMMs in EPA that multiply some zeros. The reference path's
    operations are the ones the paper's multiply-add counts count, and it runs ``F.conv3d`` so
    that ``torch.utils.flop_counter`` sees every convolution.
    """
    global _REFERENCE
    previous, _REFERENCE = _REFERENCE, enabled
    try:
        yield
    finally:
        _REFERENCE = previous
