"""The layering of the packages, checked on the source: what each layer may import.

From the bottom: shared leaf modules; optim; model; data and store; the inference layer
(checkpoint format, weights cache, loading, file -> model input, export, bundles); evaluation;
search; training; and at the top the CLI and the console. A module may import its own layer, the
leaves and the layers its row lists. Imports inside functions count: a late import is still a
dependency, it only moves the cost.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Leaf modules: each imports at most other leaves, and every layer may import them.
LEAVES = {"nlmm.config", "nlmm.errors", "nlmm.paths", "nlmm.units", "nlmm.metric_names",
          "nlmm.devices", "nlmm.backbones"}
BELOW_EVAL = {"nlmm.optim", "nlmm.model", "nlmm.data", "nlmm.store", "nlmm.inference"}
ALLOWED: dict[str, set[str]] = {
    "leaf": set(),
    "nlmm.optim": set(),
    "nlmm.model": {"nlmm.optim"},
    "nlmm.data": set(),
    "nlmm.store": set(),
    "nlmm.inference": {"nlmm.optim", "nlmm.model", "nlmm.data", "nlmm.store"},
    "nlmm.eval": BELOW_EVAL,
    "nlmm.search": BELOW_EVAL | {"nlmm.eval"},
    "nlmm.train": BELOW_EVAL | {"nlmm.eval"},
    # the package face: `nlmm.load_bundle`, imported when called
    "nlmm": {"nlmm.inference"},
    "nlmm.cli": BELOW_EVAL | {"nlmm.eval", "nlmm.search", "nlmm.train", "console"},
    "console": BELOW_EVAL | {"nlmm.eval", "nlmm.search", "nlmm.train", "nlmm.cli"},
}


def layer(module: str) -> str:
    """The layer of a dotted module name (a name inside a module counts as that module)."""
    if module == "nlmm":
        return "nlmm"
    if module.startswith("console"):
        return "console"
    top = ".".join(module.split(".")[:2])
    return "leaf" if top in LEAVES else top


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute and relative import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else module_name(path, root)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from nlmm import store` imports the module nlmm.store
            found += [(node.lineno, f"{base}.{alias.name}" if base in ("nlmm", "console") else base)
                      for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    """Every import of `root`'s nlmm/ and console/ packages that its layer may not make."""
    out = []
    for package in ("nlmm", "console"):
        for path in sorted((root / package).rglob("*.py")):
            source = layer(module_name(path, root))
            allowed = ALLOWED.get(source)
            if allowed is None:
                out.append(f"{path.relative_to(root)}: no layer for {module_name(path, root)}")
                continue
            for line, target in imports(path, root):
                if target.split(".")[0] not in ("nlmm", "console") or target == "nlmm":
                    continue  # (the package face holds the version and one lazy import)
                dest = layer(target)
                if dest not in (source, "leaf") and dest not in allowed:
                    out.append(f"{path.relative_to(root)}:{line}: {source} imports {target}")
    return out


def test_every_import_respects_the_layering() -> None:
    assert violations(ROOT) == []


def test_every_package_has_a_layer() -> None:
    packages = {layer(module_name(p, ROOT)) for d in ("nlmm", "console")
                for p in (ROOT / d).rglob("*.py")}
    assert packages <= set(ALLOWED)


def test_a_planted_upward_import_is_caught(tmp_path: Path) -> None:
    """The check on a copy of the tree where a low layer reaches up: it names the file and line."""
    for package in ("nlmm", "console"):
        for path in (ROOT / package).rglob("*.py"):
            copy = tmp_path / path.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text())
    assert violations(tmp_path) == []
    planted = tmp_path / "nlmm" / "data" / "cache.py"
    planted.write_text(planted.read_text() + "\n\ndef _late():\n    from nlmm.train import loop\n")
    model = tmp_path / "nlmm" / "model" / "layers.py"
    model.write_text("from ..cli.app import app\n" + model.read_text())
    found = violations(tmp_path)
    assert len(found) == 2
    assert found[0].startswith("nlmm/data/cache.py:")
    assert found[0].endswith("nlmm.data imports nlmm.train")
    assert found[1] == "nlmm/model/layers.py:1: nlmm.model imports nlmm.cli.app"
