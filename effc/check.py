"""``effc check``: are two models the same function? Random inputs, several seeds."""

from __future__ import annotations

from effc.errors import InputError
from effc.inputs import random_inputs
from effc.numerics import compare_outputs, merge_comparisons


def check_models(a, b, rtol: float = 1e-4, atol: float = 1e-5, seeds: int = 3, shapes=None) -> dict:
    """Run ``a`` and ``b`` (FxModel or OnnxModel) on the same random inputs and compare."""
    specs_a = {s.name: s for s in a.input_specs()}
    specs_b = {s.name for s in b.input_specs()}
    if set(specs_a) != specs_b:
        raise InputError(
            f"the models have different inputs: {sorted(specs_a)} vs {sorted(specs_b)}"
        )
    vocab = a.vocab_hint() or b.vocab_hint()
    per_seed = []
    for seed in range(seeds):
        x = random_inputs(list(specs_a.values()), seed, shapes, vocab)
        per_seed.append(compare_outputs(a.run(x), b.run(x), rtol, atol))
    result = merge_comparisons(per_seed)
    result.update(rtol=rtol, atol=atol, seeds=seeds)
    return result
