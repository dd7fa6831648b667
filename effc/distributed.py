"""Data-parallel calibration over processes with ``torch.distributed`` (started with ``torchrun``).

Every process runs the same pipeline on the same model; the calibration statistics (Hessians
X^T X, squared column norms) are accumulated by each process over its own share of the
calibration inputs (``inputs[rank::world]``) in fp64 and summed over processes with one
``all_reduce`` per statistic, in the order the passes ask for them (every process asks in the
same order), so every process gets the same statistics and makes the same decisions. The sum
order differs from one process's, so a mask or code decided by a float tie may differ from a
one-process run (the test measures it). Only the first process writes the artifact.

    torchrun --nproc-per-node 2 -m effc.cli compile MODEL --passes ... --calib ... -o OUT

On CPU the backend is gloo; ``EFFC_DIST_BACKEND`` picks another.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from effc.errors import InputError


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group(os.environ.get("EFFC_DIST_BACKEND", "gloo"))
    return True


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def shard(inputs: list) -> list:
    """This process's share of the calibration inputs."""
    rank, size = world()
    if size == 1:
        return inputs
    if len(inputs) < size:
        raise InputError(
            f"{len(inputs)} calibration samples cannot be shared by {size} processes: give at "
            "least one per process"
        )
    return inputs[rank::size]


def sum_(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over processes, in place (fp64 accumulators stay fp64)."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
