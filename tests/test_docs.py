"""README.md and docs/*.md: every python block names the test that runs it (this module runs the
ones marked setup=...), every `fourbit` command parses, every link resolves, and every table equals
what benchmarks/docs_tables.py generates from the committed results (docs/layout.md)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- test: (\S+)(?: setup=(\w+))? -->\n)?```(\w*)\n(.*?)```", re.S)


def blocks(lang: str):
    """(page, test file, setup, code) of every ```lang block."""
    for page in PAGES:
        for test, setup, found, code in FENCE.findall(page.read_text()):
            if found == lang:
                yield page, test or None, setup or None, code


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---- the names each setup gives a block ------------------------------------------------------------

def _dense_model(monkeypatch):
    from helpers import tiny_llama

    return {"model": tiny_llama(0)}


def _weight(monkeypatch):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(96, 256, generator=g), "x": torch.randn(3, 256, generator=g), "bias": torch.randn(96, generator=g)}


def _qlora_under_torchrun(monkeypatch):
    """One process as torchrun would start it (world size 1, gloo on the CPU)."""
    import socket

    from helpers import global_batch, qlora_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    return {"model": qlora_model(), "global_batch": global_batch(0, 128)}


SETUPS = {"dense_model": _dense_model, "weight": _weight, "qlora_under_torchrun": _qlora_under_torchrun}
RUN_HERE = [(p, s, c) for p, t, s, c in blocks("python") if t == "tests/test_docs.py"]


def test_every_python_block_names_a_test_that_reads_its_page():
    for page, test, setup, code in blocks("python"):
        where = f"{_name(page)}: block starting {code.splitlines()[0]!r}"
        assert test, f"{where} has no '<!-- test: tests/FILE.py -->' line"
        assert (ROOT / test).is_file(), f"{where} names {test}, which does not exist"
        if test == "tests/test_docs.py":
            assert setup in SETUPS, f"{where}: setup={setup} is not one of {sorted(SETUPS)}"
        else:
            assert page.name in (ROOT / test).read_text(), f"{where}: {test} never reads {page.name}"
    assert len(RUN_HERE) >= 4


@pytest.mark.parametrize("page,setup,code", RUN_HERE, ids=[f"{p.name}-{s}-{i}" for i, (p, s, _) in enumerate(RUN_HERE)])
def test_block_runs(page, setup, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = SETUPS[setup](monkeypatch)
    try:
        exec(compile(code, _name(page), "exec"), namespace)
    finally:
        if setup == "qlora_under_torchrun":
            from fourbit.train import distributed

            distributed.teardown()
    if setup == "weight":
        want = namespace["x"] @ namespace["w_hat"].T + namespace["bias"]
        assert torch.allclose(namespace["y"], want, rtol=1e-4, atol=1e-4)
        assert set(namespace["loaded"]) == {"weight"}
    if setup == "dense_model":
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    if setup == "qlora_under_torchrun":
        assert torch.isfinite(namespace["loss"]) and (tmp_path / "run" / "checkpoint").is_dir()


def _commands():
    """(page, argv) of every command line in a ```bash block; '[...]' placeholders dropped."""
    for page, _, _, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line).strip()
            if not line or line.startswith("#"):
                continue
            for part in line.split(" && "):
                yield page, shlex.split(part, comments=True)


def test_every_fourbit_command_parses():
    from fourbit.cli import build_parser

    seen = 0
    for page, argv in _commands():
        if argv[0] == "fourbit":
            args = argv[1:]
        elif "fourbit.cli" in argv:
            args = argv[argv.index("fourbit.cli") + 1:]
        else:
            continue
        seen += 1
        try:
            build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{_name(page)}: {shlex.join(argv)} does not parse")
    assert seen >= 8


def test_every_module_and_script_named_exists():
    for page, argv in _commands():
        if "-m" in argv and argv[0] in ("python", "python3", "torchrun"):
            module = argv[argv.index("-m") + 1]
            assert importlib.util.find_spec(module) is not None, f"{_name(page)}: no module {module}"
        if argv[0] == "bash":
            assert (ROOT / argv[1]).is_file(), f"{_name(page)}: no script {argv[1]}"


def test_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{_name(page)} links to {target}, which does not exist"


def test_readme_is_a_front_door_to_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"


def test_tables_are_generated_from_committed_results():
    from benchmarks import docs_tables

    for page in PAGES:
        for name in re.findall(r"^<!-- table: ([\w-]+) -->$", page.read_text(), flags=re.M):
            assert name in docs_tables.TABLES, f"{_name(page)}: unknown table {name}"
    assert docs_tables.stale_pages() == [], "run python -m benchmarks.docs_tables"
