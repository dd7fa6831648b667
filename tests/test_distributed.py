"""Data-parallel calibration on torch.distributed (gloo, 2 processes on this CPU): the same weights
as one process, up to float-order ties, which are counted."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import token_calibration

import effc
from effc import distributed
from effc.errors import InputError
from tools.bench.scale import write_llama


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


needs_hf = pytest.mark.skipif(not _has_transformers(), reason="HF folders: the llm extra")

PIPELINES = [
    "group-prune{sparsity=0.5,score=obs},quantize{bits=4,group=16,method=gptq}",
    "group-prune{sparsity=0.5,score=wanda,sequential=true},"
    "quantize{bits=4,group=16,method=gptq,sequential=true}",
    # BQPO data-parallel: each step's 2 samples split over the processes, gradients all-reduced
    "group-prune{sparsity=0.5},quantize{bits=4,group=16},gqsa-train{steps=4,samples=4,batch=2}",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def calibration(n=4):
    return token_calibration(n, mask=True)


def compress(folder, text) -> dict[str, torch.Tensor]:
    result = effc.Pipeline.from_text(text).run(
        str(folder), effc.PassContext(calibration=calibration())
    )
    return {k: s.dequantized() for k, s in result.model.compression.quantized().items()}


def _worker(rank, world, port, folder, text, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    assert distributed.init_from_env() and distributed.world() == (rank, world)
    weights = compress(folder, text)
    if rank == 0:
        torch.save(weights, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "m"
    write_llama(path, blocks=2, hidden=64, inter=160, heads=4, vocab=256)
    return path


@needs_hf
@pytest.mark.parametrize("text", PIPELINES)
def test_two_processes_give_the_weights_of_one(folder, tmp_path, text):
    one = compress(folder, text)
    out = tmp_path / "w.pt"
    mp.spawn(_worker, args=(2, _port(), folder, text, out), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    assert one.keys() == two.keys() and len(one) == 15
    flips = sum(int((one[k] != two[k]).sum()) for k in one)
    total = sum(v.numel() for v in one.values())
    # the Hessians are summed in another order (per process, then across): only a weight whose
    # code or mask a float tie decides may differ; measured: none here
    assert flips <= total * 1e-4, f"{flips} of {total} weights differ"


@needs_hf
def test_bqpo_needs_a_sample_per_process_in_each_step(folder, monkeypatch):
    from effc.errors import PassOptionError
    from effc.passes import gqsa_train

    monkeypatch.setattr(gqsa_train, "world", lambda: (0, 2))
    text = "quantize{bits=4,group=16},gqsa-train{steps=1,samples=2}"
    with pytest.raises(PassOptionError, match="batch >= 2"):
        effc.Pipeline.from_text(text).run(str(folder), effc.PassContext(calibration=calibration(2)))


def test_shard_needs_a_sample_per_process(monkeypatch):
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]  # one process: everything
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    assert distributed.shard([1, 2, 3, 4, 5]) == [2, 4]
    with pytest.raises(InputError, match="1 calibration samples cannot be shared by 2"):
        distributed.shard([1])


@needs_hf
def test_torchrun_compiles_with_one_writer(folder, tmp_path):
    np.savez(
        tmp_path / "c.npz", **{k: np.stack([c[k] for c in calibration()]) for k in calibration()[0]}
    )
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"out{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}"]
        cmd += ["--master-port", str(_port()), "-m", "effc.cli", "compile", str(folder)]
        cmd += ["--passes", PIPELINES[0], "--calib", str(tmp_path / "c.npz"), "-o", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1", EFFC_THREADS="1")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("wrote") == 1  # only the first process writes and reports
        outs[procs] = out
    np.savez(tmp_path / "x.npz", **calibration()[0])
    got = []
    for out in outs.values():
        subprocess.run(
            [sys.executable, "-m", "effc.cli", "run", str(out), "--inputs", str(tmp_path / "x.npz")]
            + ["--out", str(out / ".." / f"{out.name}.npz")],
            check=True,
            capture_output=True,
        )
        got.append(np.load(tmp_path / f"{out.name}.npz"))
    for k in got[0]:
        np.testing.assert_array_equal(got[0][k], got[1][k])
