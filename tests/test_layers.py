"""The package's layers import only downward (README, "Where things are"): an upward arrow is a design bug."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "arcflow"
LAYERS = [{"config", "distributed", "images", "checksums"}, {"metrics"}, {"method"}, {"models"}, {"pipelines", "data"},
          {"training"}, {"inference"}, {"evaluation", "demo"}, {"cli"}]
"""Lowest first; a module may import its own part and any part of a lower layer."""


def layer_of(part: str) -> int:
    (index,) = [i for i, layer in enumerate(LAYERS) if part in layer]
    return index


def runtime_imports(tree: ast.Module) -> list[str]:
    """``arcflow.*`` modules imported at run time (imports under ``if TYPE_CHECKING:`` name types only)."""
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("arcflow."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("arcflow.")]
    return found


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert parts == set().union(*LAYERS)


def test_imports_run_down_the_layers() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.relative_to(PACKAGE).with_suffix("").parts[0]
        for module in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            target = module.split(".")[1]
            if target != source and layer_of(target) >= layer_of(source):
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not upward, upward
