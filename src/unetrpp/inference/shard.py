"""Sharded prediction: each process of a job array (``--part-id K --num-parts N``) or of ``torchrun``
(``RANK`` of ``WORLD_SIZE``) predicts its share of the cases.

The share is taken from the sorted list of every case of the input, before the cases whose output
already exists are dropped, so every part agrees on the split whatever is on disk. Cases are dealt
round-robin (case ``i`` to part ``i % N``): with sorted names, neighbours tend to be alike (one
scanner, one series), so dealing them out balances the parts better than contiguous blocks.

Under ``torchrun`` no process group is created: the ranks share nothing (disjoint outputs, each file
written atomically), and a final barrier would need a timeout longer than the largest imbalance
between shards, which nobody can know (one large case can take an hour). A failing rank exits
non-zero; ``torchrun`` reports which one and stops the others. Each rank prints its own summary.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Which part of the cases this process predicts (``part`` of ``parts``, 0-based)."""

    part: int = 0
    parts: int = 1
    local_rank: int = 0  # torchrun: this process's index on its node (its GPU)
    local_parts: int = 1  # torchrun: processes on this node (they share its cores)
    torchrun: bool = False
    requested: bool = False  # sharding was asked for: the summary names the part

    @property
    def prefix(self) -> str:
        """``"part K/N: "`` for the summary line, empty when not sharded."""
        return f"part {self.part}/{self.parts}: " if self.requested else ""

    def select(self, items: Sequence[T], key: Callable[[T], object] | None = None) -> list[T]:
        """This part's share of ``items``: sorted (by ``key``), then every ``parts``-th from ``part``."""
        ordered = sorted(items, key=key) if key is not None else sorted(items)  # type: ignore[type-var]
        return ordered[self.part::self.parts]


def torchrun_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int, int] | None:
    """``(rank, world size, local rank, local world size)`` from torchrun's variables; None outside torchrun."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    try:
        world = int(env["WORLD_SIZE"])
        rank, local = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        shown = ", ".join(f"{n}={env[n]!r}" for n in names if n in env)
        raise UserError(f"{shown}: torchrun's process variables must be integers") from None
    if world < 1 or not 0 <= rank < world or local_world < 1 or not 0 <= local < local_world:
        shown = ", ".join(f"{n}={env[n]}" for n in names if n in env)
        raise UserError(f"{shown}: inconsistent torchrun process variables (need 0 <= RANK < WORLD_SIZE and "
                         "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE)")
    return rank, world, local, local_world


def shard_of(part_id: int | None, num_parts: int | None, env: Mapping[str, str] | None = None) -> Shard:
    """The share of this process from ``--part-id``/``--num-parts`` or torchrun's variables (one-line errors)."""
    dist = torchrun_env(env)
    if part_id is None and num_parts is None:
        if dist is None or dist[1] == 1:
            return Shard(local_rank=dist[2] if dist else 0, torchrun=dist is not None)
        rank, world, local, local_world = dist
        return Shard(rank, world, local, local_world, torchrun=True, requested=True)
    if dist is not None and dist[1] > 1:
        raise UserError(f"--part-id/--num-parts: under torchrun each rank already predicts its share (rank {dist[0]} "
                         f"of {dist[1]}); drop them, or run the parts without torchrun")
    if num_parts is None:
        raise UserError(f"--part-id {part_id}: needs --num-parts (how many parts the cases are split into)")
    if part_id is None:
        raise UserError(f"--num-parts {num_parts}: needs --part-id (which part, 0 to {max(num_parts, 1) - 1})")
    if num_parts < 1:
        raise UserError(f"--num-parts {num_parts}: must be at least 1")
    if not 0 <= part_id < num_parts:
        raise UserError(f"--part-id {part_id}: must be 0 to {num_parts - 1} for --num-parts {num_parts}")
    return Shard(part_id, num_parts, requested=True)


def device_for(device: str, shard: Shard) -> str:
    """Under torchrun, ``auto`` and ``cuda`` mean this rank's own GPU, ``cuda:LOCAL_RANK``; else ``device``."""
    import torch

    if not shard.torchrun or str(device) not in ("auto", "cuda"):
        return device
    if not torch.cuda.is_available():
        return "cpu" if str(device) == "auto" else device  # resolve_device says that there is no CUDA
    count = torch.cuda.device_count()
    if shard.local_rank >= count:
        raise UserError(f"LOCAL_RANK={shard.local_rank}: this machine has {count} CUDA device(s); start at most "
                         f"{count} process(es) per node (--nproc_per_node), one GPU each")
    return f"cuda:{shard.local_rank}"


def threads_per_rank(local_parts: int, env: Mapping[str, str] | None = None, cores: int | None = None) -> int:
    """CPU threads for each of ``local_parts`` processes on one node: an explicit ``OMP_NUM_THREADS`` above 1,
    else the node's cores divided among them (``OMP_NUM_THREADS=1`` is what torchrun sets by default, so it
    cannot tell a choice from torchrun's default and is overridden)."""
    env = os.environ if env is None else env
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 1:
        return min(int(omp), 1024)  # a thread count, not whatever number the variable holds
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_parts))


def configure(device: str, shard: Shard) -> str:
    """Set this process up for its share: its own GPU under torchrun, or on CPU its slice of the node's
    cores when several ranks share the node. Returns the device to predict on."""
    import torch

    device = device_for(device, shard)
    if not shard.torchrun:
        return device
    kind = str(device).split(":")[0]
    if kind == "cuda" and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))
    elif kind == "cpu" and shard.local_parts > 1:
        torch.set_num_threads(threads_per_rank(shard.local_parts))
    return device
