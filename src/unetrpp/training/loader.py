"""Background worker processes that draw augmented batches, so augmentation overlaps compute."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .sampler import PatchSampler


class BatchStream(torch.utils.data.IterableDataset):
    """An endless stream of ``(images, labels)`` tensors; each worker (and rank) draws its own patches.

    Batch ``b`` of rank ``r`` is drawn from ``(seed, r, b)``, whichever of the ``W`` workers draws
    it (worker ``w`` draws ``start + w``, ``start + w + W``, ... and the loader hands them out in
    that order): streams never repeat each other, the same seed gives the same batches for any
    number of workers, and a stream started at ``start`` continues one stopped there exactly.
    """

    def __init__(self, seed: int | Sequence[int] = 0, rank: int = 0, start: int = 0, **sampler_kwargs):
        """``sampler_kwargs`` are :class:`PatchSampler`'s (folder, names, patch_size, batch_size, ...)."""
        self.kwargs = sampler_kwargs
        self.seed = list(seed) if isinstance(seed, (list, tuple)) else [int(seed)]
        self.rank = rank
        self.start = int(start)
        PatchSampler(**self.kwargs)  # fail here, in the main process, on a missing case

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        sampler = PatchSampler(**self.kwargs, seed=[*self.seed, self.rank, 0])
        index = self.start + worker
        while True:
            sampler.reseed([*self.seed, self.rank, index])
            index += workers
            x, y = sampler.batch()
            yield torch.from_numpy(x), torch.from_numpy(y.astype(np.int64, copy=False))


def batch_loader(stream: BatchStream, workers: int = 2, pin_memory: bool = False):
    """A DataLoader over ``stream`` with ``workers`` background processes (0: in this process)."""
    kwargs = dict(batch_size=None, num_workers=workers, pin_memory=pin_memory)
    if workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=2)
    return torch.utils.data.DataLoader(stream, **kwargs)
