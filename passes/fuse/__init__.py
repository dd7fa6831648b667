"""fuse: one pass, a growing table of exact fusion rules (DESIGN.md section 3).

Each rule has an ONNX form (an onnxscript rewriter rule set) and/or an FX form (a function that
rewrites a GraphModule and returns how often it fired). ``rules=[...]`` picks some; the default
runs every rule. The report counts each rule's firings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir.passes.common as common

from effc.errors import PassOptionError, did_you_mean
from effc.pass_base import Pass, PassResult
from effc.passes.fuse.rules import BITWISE_RULES, RULES
from effc.registry import register


@register
class Fuse(Pass):
    """Exact operator fusion: Conv+BatchNorm folding, MatMul+Add -> Gemm, ..."""

    name = "fuse"

    @dataclass
    class Options:
        rules: list[str] = field(default_factory=lambda: list(RULES))

    def validate(self) -> None:
        self.bitwise = set(self.options.rules) <= BITWISE_RULES
        for rule in self.options.rules:
            if rule not in RULES:
                raise PassOptionError(
                    f"pass 'fuse': unknown rule '{rule}'{did_you_mean(rule, RULES)}; "
                    f"rules: {', '.join(RULES)}"
                )

    def run(self, model, ctx) -> PassResult:
        stats: dict[str, int | str] = {}
        if model.kind == "onnx":  # the rules read static shapes of intermediate values
            common.ShapeInferencePass(strict_mode=False)(model.model)

        for name in self.options.rules:
            rule = RULES[name]
            if model.kind == "onnx" and rule.onnx is not None:
                stats[name] = rule.onnx().apply_to_model(model.model)
            elif model.kind == "fx" and rule.fx is not None:
                stats[name] = rule.fx(model)
            else:
                stats[name] = f"n/a on {model.kind}"
        fired = sum(v for v in stats.values() if isinstance(v, int))
        if fired and model.kind == "onnx":
            common.RemoveUnusedNodesPass()(model.model)
        return PassResult(model, fired > 0, stats)
