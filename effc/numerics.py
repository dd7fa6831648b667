"""Output comparison shared by the pipeline's verifier, ``effc check`` and ``effc.testing``.

A rewrite that is exact in real arithmetic still rounds differently in fp32, and an
ill-conditioned model (normalisations, attention over channels) amplifies that rounding far past a
fixed tolerance. So a comparison may carry the model's own **noise floor**: per output, the
largest change one fp32 rounding of every weight and input causes (each value moved one ulp up
or down at random, ``run_nudged`` of the IR models). Outputs pass when they are within
``atol + rtol * |ref|`` everywhere, or when their largest error is within ``multiple`` times the
floor (``FLOOR_MULTIPLE`` by default)."""

from __future__ import annotations

import numpy as np

# A correct fp32 rewrite moves the outputs by at most a few times what one rounding of every
# weight and input does (measured: 0.5-3x on effc's models and the zoo); wrong rewrites (a
# BatchNorm on the wrong axis, a transposed weight) move them by 1e3x and more.
FLOOR_MULTIPLE = 16.0


def noise_floor(reference: list[list], nudged: list[list[list]]) -> list[float]:
    """Per output index: the largest |nudged - reference| over every input set and nudge seed."""
    floors = [0.0] * len(reference[0]) if reference else []
    for runs in nudged:
        for ref, out in zip(reference, runs):
            for i, (r, o) in enumerate(zip(ref, out)):
                r, o = np.asarray(r), np.asarray(o)
                if r.size and np.issubdtype(r.dtype, np.floating):
                    d = np.abs(r.astype(np.float64) - o)
                    floors[i] = max(floors[i], float(d[np.isfinite(d)].max(initial=0.0)))
    return floors


def compare_outputs(
    ref: list[np.ndarray],
    out: list[np.ndarray],
    rtol: float = 1e-4,
    atol: float = 1e-5,
    floors: list[float] | None = None,
    multiple: float = FLOOR_MULTIPLE,
) -> dict:
    """Compare two output lists: max abs error, max error relative to the reference's range,
    whether all are within ``|a - b| <= atol + rtol * |b|`` (or, with ``floors``, within
    ``multiple`` times each output's noise floor), and whether they are bit-identical."""
    if len(ref) != len(out):
        return {"ok": False, "reason": f"{len(out)} outputs, expected {len(ref)}"}
    max_abs = max_rel = 0.0
    ok = identical = within_tolerance = True
    worst_ratio, worst_floor = 0.0, None
    for i, (r, o) in enumerate(zip(ref, out)):
        r, o = np.asarray(r), np.asarray(o)
        if r.shape != o.shape:
            return {
                "ok": False,
                "reason": f"output shape {list(o.shape)}, expected {list(r.shape)}",
            }
        identical = identical and r.dtype == o.dtype and np.array_equal(r, o, equal_nan=True)
        if r.size == 0:
            continue
        rf, of = r.astype(np.float64), o.astype(np.float64)
        diff = np.abs(rf - of)
        finite = np.isfinite(diff)
        nan_ok = finite.all() or np.array_equal(np.isnan(rf), np.isnan(of))
        d = float(diff[finite].max()) if finite.any() else 0.0
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / (float(np.abs(rf[np.isfinite(rf)]).max(initial=0.0)) + 1e-12))
        close = bool(np.allclose(of, rf, rtol=rtol, atol=atol, equal_nan=True))
        within_tolerance = within_tolerance and close and nan_ok
        if floors is not None and floors[i] > 0:
            ratio = d / floors[i]
            if ratio >= worst_ratio:
                worst_ratio, worst_floor = ratio, floors[i]
            close = close or ratio <= multiple
        ok = ok and close and nan_ok
    result = {
        "ok": ok,
        "identical": identical,
        "within_tolerance": within_tolerance,
        "max_abs": max_abs,
        "max_rel": max_rel,
    }
    if worst_floor is not None:
        result.update(floor=worst_floor, floor_ratio=worst_ratio)
    return result


def merge_comparisons(results: list[dict]) -> dict:
    """Worst case over several input sets."""
    merged = {
        "ok": all(r["ok"] for r in results),
        "identical": all(r.get("identical", False) for r in results),
        "within_tolerance": all(r.get("within_tolerance", False) for r in results),
    }
    for key in ("max_abs", "max_rel"):
        merged[key] = max((r.get(key, float("inf")) for r in results), default=0.0)
    ratios = [r for r in results if "floor_ratio" in r]
    if ratios:
        worst = max(ratios, key=lambda r: r["floor_ratio"])
        merged.update(floor=worst["floor"], floor_ratio=worst["floor_ratio"])
    reasons = [r["reason"] for r in results if "reason" in r]
    if reasons:
        merged["reason"] = reasons[0]
    return merged


def compare_runs(
    ref: list[list], out: list[list], rtol=1e-4, atol=1e-5, floors=None, multiple=FLOOR_MULTIPLE
) -> dict:
    """``compare_outputs`` over every input set, merged."""
    return merge_comparisons(
        [compare_outputs(a, b, rtol, atol, floors, multiple) for a, b in zip(ref, out)]
    )
