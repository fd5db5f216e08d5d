"""The import rules, checked on the source (every import, function-level ones included; no exceptions list).
`python -m pytest -q tests/test_layers.py`

The library is layered; a module may import its own layer and the layers below it, never one above:

    dynboot.cli                                  the `dynboot` command (launches jobs by name, never imports them)
    dynboot.training | dynboot.eval              the one training core | metrics, reports, the judge, world eval
    dynboot.method                               recognition weights, verification, best-of-N, the prediction core
    dynboot.models                               the model interface, the backends, prompt layouts
    dynboot.world                                the embedded world (scenes, actions, renderer, episodes)
    dynboot.data                                 AURORA sets, pair rows, videos and key frames, mixtures, ingest
    dynboot.io, dynboot.config                   URIs, images, run directories, partitions, typed configs

`training` and `eval` sit side by side and do not import each other. The library never imports `jobs` or
`serve`; `serve` never imports `jobs`; between job families (relabel, train, filter, ...) a job imports only
another's public API (`run`, `main`, its `*Config` classes and what its `__all__` lists), and job modules form no
import cycle.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [{"dynboot.io", "dynboot.config"}, {"dynboot.data"}, {"dynboot.world"}, {"dynboot.models"},
          {"dynboot.method"}, {"dynboot.training", "dynboot.eval"}, {"dynboot.cli"}]
PUBLIC = ("run", "main")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import statement in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [a.name for a in node.names]
            if node.module == "dynboot":  # `from dynboot import storage` names modules
                out += [(f"dynboot.{n}", [], node.lineno) for n in names]
            else:
                out.append((node.module, names, node.lineno))
    return out


def sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def layer_of(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer):
            return i
    return None


def unit_of(module: str) -> str:
    """dynboot.<package> (or dynboot.config / dynboot.cli): what the layers are made of."""
    return ".".join(module.split(".")[:2])


def test_every_library_module_belongs_to_a_layer():
    orphans = [module_name(p) for p in sources("dynboot") if module_name(p) != "dynboot"
               and layer_of(module_name(p)) is None]
    assert not orphans, f"modules outside every layer (put them in a package of tests/test_layers.py's LAYERS): {orphans}"


def test_library_imports_only_its_own_layer_and_below():
    wrong = []
    for path in sources("dynboot"):
        me = module_name(path)
        mine = layer_of(me)
        for target, _, line in imports(path):
            if target.split(".")[0] in ("jobs", "serve"):
                wrong.append(f"{me}:{line} imports {target} (the library never imports jobs/ or serve/)")
                continue
            if not target.startswith("dynboot.") or mine is None:
                continue
            theirs = layer_of(target)
            side_by_side = theirs == mine and unit_of(target) != unit_of(me) and len(LAYERS[mine]) > 1 \
                and mine != 0  # training and eval are independent; io and config may use each other
            if theirs is not None and (theirs > mine or side_by_side):
                wrong.append(f"{me}:{line} imports {target} ({unit_of(target)} is not below {unit_of(me)})")
    assert not wrong, "\n".join(wrong)


def public_names(module: str) -> set[str]:
    """A job module's `__all__` (its public API beyond run/main/*Config)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def family(module: str) -> str:
    """jobs.relabel_stages -> relabel; jobs.bench_relabel -> bench_relabel (a benchmark is its own family)."""
    name = module.split(".", 1)[1]
    return name if name.startswith("bench_") else name.split("_")[0]


def test_jobs_use_each_other_only_through_public_entry_points_and_form_no_cycle():
    wrong, graph = [], defaultdict(set)
    for path in sources("jobs"):
        me = module_name(path)
        for target, names, line in imports(path):
            if not target.startswith("jobs.") and target != "jobs":
                continue
            graph[me].add(target)
            if target == "jobs" or family(target) == family(me):
                continue
            public = public_names(target)
            private = [n for n in names if not (n in PUBLIC or n.endswith("Config") or n in public)] or \
                ([] if names else ["*"])
            if private:
                wrong.append(f"{me}:{line} imports {private} from {target} (only run/main/*Config/__all__ across jobs)")
    for path in sources("serve"):
        for target, _, line in imports(path):
            if target.split(".")[0] == "jobs":
                wrong.append(f"{module_name(path)}:{line} imports {target} (serve never imports jobs)")
    seen, stack = set(), []

    def visit(node: str) -> None:
        if node in stack:
            wrong.append("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt != "jobs":
                visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert not wrong, "\n".join(wrong)
