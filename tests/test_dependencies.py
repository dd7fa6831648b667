"""Every third-party module effc imports is declared in pyproject.toml: module-level imports by
the base dependencies (what README's install gives), function-level ones (optional features:
transformers, tensorrt, ...) by the base dependencies or an extra."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions

import tomllib
from test_layering import ROOT, package_files

# import names whose distribution is not installed here (optional targets) or not derivable
KNOWN = {
    "tensorrt": "tensorrt",
    "tvm": "apache-tvm",
    "google": "protobuf",
    "skimage": "scikit-image",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in reqs}

    extras = set().union(*(names(v) for v in project["optional-dependencies"].values()))
    return names(project["dependencies"]), extras


def third_party_imports():
    """(file, top-level module name, inside a function) of every non-first-party import."""
    for path in package_files():
        tree = ast.parse((ROOT / path).read_text())
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            p, inside = node, False
            while p in parents:
                p = parents[p]
                inside |= isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef))
            for mod in mods:
                top = mod.split(".")[0]
                if top != "effc" and top not in sys.stdlib_module_names and top != "__future__":
                    yield path, top, inside


def distribution(module: str) -> str:
    if module in KNOWN:
        return KNOWN[module]
    dists = packages_distributions().get(module)
    return _norm(dists[0]) if dists else _norm(module)  # an optional one not installed here


def test_every_import_is_declared():
    base, extras = declared()
    problems = []
    for path, module, inside in third_party_imports():
        dist = distribution(module)
        if dist in base or (inside and dist in extras):
            continue
        where = "an extra" if inside else "the base dependencies"
        problems.append(f"{path} imports {module} ({dist}), which is not in {where}")
    assert not problems, "\n".join(sorted(set(problems)))
