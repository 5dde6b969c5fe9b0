"""``unetrpp bench``: speed and memory of the network, EPA scaling and whole-volume inference.

Every figure is a median over ``repeats`` timed runs after warm-up, and is recorded with the
machine (CPU model, cores, GPU), torch version and thread count. Each measurement runs in its own
process (``python -m unetrpp.bench --worker``), so a peak memory figure is that measurement's
own: peak resident set on the CPU, peak allocated memory on CUDA.

What can be measured (``--what``):

* ``rates``: the machine's own conv3d and matmul multiply-add rates, to put the others in context;
* ``forward``: eval forward of one patch (batch 1, no grad): latency, multiply-adds per second;
* ``train``: one training step of the official recipe (batch 2, SGD Nesterov 0.99, Dice + CE with
  deep supervision, gradient clipping at 12): latency and peak memory;
* ``epa``: one EPA attention against standard multi-head self-attention
  (``scaled_dot_product_attention``) over channels C and token counts N, with the growth exponent
  of time in N fitted per C (least squares on log-log);
* ``sliding``: whole-volume sliding-window prediction (overlap 0.5, Gaussian weighting, optional
  8-way mirroring), optionally against MONAI's ``sliding_window_inference`` driving the same network;
* ``maxbatch`` (CUDA): the largest training batch that fits at the preset's patch size.

Modules: :mod:`~unetrpp.bench.harness` (timing, the machine, one process per measurement and its
``RESULT`` line), :mod:`~unetrpp.bench.measure` (the measurements), :mod:`~unetrpp.bench.baselines`
(MHSA, MONAI's driver, the CT-like volume), :mod:`~unetrpp.bench.suite` (the driver) and
:mod:`~unetrpp.bench.report` (summary lines, the EPA plot); ``python -m unetrpp.bench --worker SPEC``
is the worker. ``benchmarks/`` holds longer studies built on these.
"""

from __future__ import annotations

from .baselines import CT_NORMALISATION, MultiHeadSelfAttention, ct_like_volume, monai_sliding_probabilities
from .harness import ChildError, emit_result, machine_info, median_time, run_child, run_worker
from .measure import (
    MEASUREMENTS,
    bench_attention,
    bench_forward,
    bench_maxbatch,
    bench_rates,
    bench_sliding,
    bench_train,
    recipe_step,
    run_measurement,
)
from .report import plot_epa, print_summary
from .suite import EPA_DIMS, EPA_TOKENS, WHATS, fit_exponent, run_suite

__all__ = [
    "CT_NORMALISATION", "EPA_DIMS", "EPA_TOKENS", "MEASUREMENTS", "WHATS", "ChildError", "MultiHeadSelfAttention",
    "bench_attention", "bench_forward", "bench_maxbatch", "bench_rates", "bench_sliding", "bench_train",
    "ct_like_volume", "emit_result", "fit_exponent", "machine_info", "median_time", "monai_sliding_probabilities",
    "plot_epa", "print_summary", "recipe_step", "run_child", "run_measurement", "run_suite", "run_worker",
]
