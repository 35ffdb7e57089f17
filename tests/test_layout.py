"""The layout rules of DESIGN.md, read from the source: stages never import each other (cam
may import pretrain's mixers), library code never sees argparse, and the shared pieces
(here the distributed set-up) exist once, in `smix`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("pretrain", "transfer", "robustness", "cam")
ALLOWED = {("cam", "pretrain.mixers")}  # cam draws augmented images with pretrain's mixers


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> list[str]:
    """Every module name `path` imports, at any depth (function-level imports too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_stages_never_import_each_other(stage):
    bad = []
    for path in _modules(stage):
        for name in _imports(path):
            other = name.split(".")[0]
            if other in STAGES and other != stage and not any(
                    stage == s and (name == m or name.startswith(m + ".")) for s, m in ALLOWED):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad


def test_library_code_never_sees_argparse():
    """Only the command-line modules parse; everything else takes typed values."""
    bad = [str(p.relative_to(ROOT)) for pkg in ("smix", *STAGES) for p in _modules(pkg)
           if "argparse" in _imports(p) and p.name != "cli.py"]
    assert not bad


def _context_managers_joining_the_group(path: Path) -> list[str]:
    """Functions of `path` decorated as context managers that call `init_distributed`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.FunctionDef):
            continue
        decorated = any("contextmanager" in ast.unparse(d) for d in node.decorator_list)
        calls = {ast.unparse(c.func).split(".")[-1] for c in ast.walk(node)
                 if isinstance(c, ast.Call)}
        if decorated and "init_distributed" in calls:
            found.append(f"{path.relative_to(ROOT)}:{node.name}")
    return found


def test_distributed_setup_exists_once():
    """Joining torchrun's group for one command and leaving it only if the command joined it
    is `smix.dist.distributed`; a stage uses it rather than keeping its own copy."""
    found = [f for pkg in ("smix", *STAGES) for p in _modules(pkg)
             for f in _context_managers_joining_the_group(p)]
    assert found == ["smix/dist.py:distributed"]
