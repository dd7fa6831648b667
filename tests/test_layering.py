"""The import layering of docs/architecture.md holds: every first-party import goes to the same
or a lower layer, sits at module level, and no import cycle forms."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "effc.ir": "ir",
    "effc.passes": "passes",
    "effc.backends": "backends",
    "effc.runtime": "runtime",
    "effc.models": "models",
    "effc": "effc",
}


def layer_table() -> dict[str, int]:
    """{path or folder/: layer} from the table in docs/architecture.md."""
    table = {}
    text = (ROOT / "docs" / "architecture.md").read_text()
    for line in text.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|(.*?)\|", line)
        if m:
            for path in re.findall(r"`([^`]+)`", m.group(2)):
                table[path] = int(m.group(1))
    return table


def layer_of(path: str, table: dict[str, int]) -> int:
    if path in table:
        return table[path]
    folder = path.split("/")[0] + "/"
    assert folder in table, f"{path} has no layer in docs/architecture.md"
    return table[folder]


def module_file(name: str) -> str | None:
    for prefix in sorted(PACKAGES, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            rest = name[len(prefix) :].lstrip(".").replace(".", "/")
            base = PACKAGES[prefix] + ("/" + rest if rest else "")
            for cand in (base + ".py", base + "/__init__.py"):
                if (ROOT / cand).is_file():
                    return cand
    return None


def package_files() -> list[str]:
    files = []
    for folder in set(PACKAGES.values()):
        files += [p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py")]
    return sorted(files)


def imports(path: str):
    """(target file, inside a function) for every first-party import of ``path``."""
    tree = ast.parse((ROOT / path).read_text())
    parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        p, inside, type_only = node, False, False
        while p in parents:
            p = parents[p]
            inside |= isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef))
            type_only |= isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test)
        if type_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for target in {module_file(n) for n in names} - {None, path}:
            yield target, inside


def test_every_module_has_a_layer_and_imports_only_downward():
    table = layer_table()
    problems = []
    for path in package_files():
        mine = layer_of(path, table)
        for target, inside in imports(path):
            if inside:
                problems.append(f"{path} imports {target} inside a function")
            if layer_of(target, table) > mine:
                problems.append(
                    f"{path} (layer {mine}) imports {target} (layer {layer_of(target, table)})"
                )
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {p: {t for t, _ in imports(p)} for p in package_files()}
    seen, stack, on = set(), [], set()

    def visit(v):
        seen.add(v), stack.append(v), on.add(v)
        for w in graph[v]:
            if w in on:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(w) :] + [w]))
            if w not in seen:
                visit(w)
        stack.pop(), on.discard(v)

    for v in graph:
        if v not in seen:
            visit(v)


def test_importing_the_ir_does_not_import_the_pipeline():
    import subprocess
    import sys

    code = "import sys, effc.ir; print(sorted(m for m in sys.modules if m.startswith('effc')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = out.stdout
    for heavy in ("effc.pipeline", "effc.passes", "effc.backends", "effc.runtime"):
        assert f"'{heavy}" not in loaded, loaded
