"""Output comparison shared by the pipeline, ``effc check`` and ``effc.testing``."""

from __future__ import annotations

import numpy as np


def compare_outputs(
    ref: list[np.ndarray], out: list[np.ndarray], rtol: float = 1e-4, atol: float = 1e-5
) -> dict:
    """Compare two output lists: max abs error, max error relative to the reference's range,
    whether all are within ``|a - b| <= atol + rtol * |b|``, and whether they are bit-identical."""
    if len(ref) != len(out):
        return {"ok": False, "reason": f"{len(out)} outputs, expected {len(ref)}"}
    max_abs = max_rel = 0.0
    ok = identical = True
    for r, o in zip(ref, out):
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
        if not finite.all() and not np.array_equal(np.isnan(rf), np.isnan(of)):
            ok = False
        d = float(diff[finite].max()) if finite.any() else 0.0
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / (float(np.abs(rf[np.isfinite(rf)]).max(initial=0.0)) + 1e-12))
        ok = ok and bool(np.allclose(of, rf, rtol=rtol, atol=atol, equal_nan=True))
    return {"ok": ok, "identical": identical, "max_abs": max_abs, "max_rel": max_rel}


def merge_comparisons(results: list[dict]) -> dict:
    """Worst case over several input sets."""
    merged = {
        "ok": all(r["ok"] for r in results),
        "identical": all(r.get("identical", False) for r in results),
    }
    for key in ("max_abs", "max_rel"):
        merged[key] = max((r.get(key, float("inf")) for r in results), default=0.0)
    reasons = [r["reason"] for r in results if "reason" in r]
    if reasons:
        merged["reason"] = reasons[0]
    return merged
