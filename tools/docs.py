"""Generate docs/passes.md from the pass declarations (name, IR kinds, lossy, options with their
types and defaults, the one-line doc, and the pass module's docstring: the math), so the pass
reference cannot drift from the code. ``python -m tools.docs`` rewrites it; a test compares."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from effc.passes.fuse.rules import BITWISE_RULES, RULES
from effc.pipeline import registry
from effc.pipeline_text import print_value

INTRO = """The same pass gives the same weights on FX and on ONNX (tests compare them), because the math
lives once, on torch tensors, and the IR adapters (weight sites) only read and write weights.

`sequential=true` (group-prune, nm-prune, GPTQ) compresses a transformer block by block, each
calibrated on what the already compressed blocks before it output, then the layers after the
blocks (lm_head) on one run of the compressed model; so every layer's error compensation also
absorbs the drift of the layers before it. On FX the blocks run one at a time on cached
activations (about one extra forward pass in all); on ONNX the whole model runs once per block
(the same activations, slower; tests check that both give the same weights). It needs repeated
blocks (a clear error otherwise); the first block's weights equal the non-sequential ones."""
OUT = Path(__file__).resolve().parents[1] / "docs" / "passes.md"


def render() -> str:
    lines = [
        "# Pass reference",
        "",
        "Generated from the pass declarations by `python -m tools.docs` (a test keeps it current).",
        "`effc list-passes` prints the same table. Pipeline text: `name{option=value,...}`, passes",
        "separated by commas, groups `seq(...)` and `fixpoint{max_iter=N}(...)`.",
        "",
        *INTRO.splitlines(),
        "",
        "| pass | IR | lossy | options (default) | what it does |",
        "|---|---|---|---|---|",
    ]
    passes = sorted(registry().items())
    for name, cls in passes:
        d = cls.describe()
        opts = ", ".join(
            f"`{o['name']}`: {o['type']} = `{print_value(o['default'])}`" for o in d["options"]
        )
        lossy = "yes" if d["lossy"] else "no"
        lines.append(
            f"| `{name}` | {', '.join(k.upper() for k in d['kinds'])} | {lossy} | "
            f"{opts or '-'} | {d['doc']} |"
        )
    lines += ["", "## fuse rules", ""]
    for key, rule in RULES.items():
        exact = "bit-identical" if key in BITWISE_RULES else "exact math, fp32 rounding"
        kinds = "/".join(k for k, f in (("ONNX", rule.onnx), ("FX", rule.fx)) if f)
        lines.append(f"- `{key}` ({kinds}; {exact}): {rule.doc}")
    for name, cls in passes:
        doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
        lines += ["", f"## {name}", "", doc]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
