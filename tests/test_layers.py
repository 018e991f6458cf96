"""The layering rule of docs/architecture.md: imports point downward only."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffusekit"
# layer -> the diffusekit layers it may import
ALLOWED = {
    "core": {"core"},
    "models": {"models"},
    "pipelines": {"pipelines", "models", "core"},
    "training": {"training", "evaluation", "media", "pipelines", "models", "core"},
    "evaluation": {"evaluation", "training", "media", "pipelines", "models", "core"},
    "media": {"media", "pipelines", "models", "core"},
    "graph": {"graph", "media", "pipelines", "models", "core"},
    "interfaces": {"interfaces", "graph", "training", "evaluation", "media", "pipelines", "models", "core"},
}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    pkg = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):       # one name per imported alias: "pkg.module.name"
            base = pkg[: len(pkg) - node.level + 1] if node.level else ()
            module = ".".join(base + ((node.module,) if node.module else ()))
            for a in node.names:
                yield f"{module}.{a.name}"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_downward(layer):
    bad = []
    for path in sorted((SRC / layer).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "diffusekit" and len(parts) > 1 and parts[1] in ALLOWED and parts[1] not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_core_imports_only_torch_and_stdlib():
    import sys
    allowed_third_party = {"torch"}
    bad = []
    for path in sorted((SRC / "core").rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in ("diffusekit", "__future__") or top in sys.stdlib_module_names or top in allowed_third_party:
                continue
            bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, "\n".join(bad)


def _reaches_root(name: str) -> bool:
    """`import diffusekit` or a name taken from the root package itself (not from a module of it)."""
    parts = name.split(".")
    return parts[0] == "diffusekit" and (len(parts) == 1 or not ((SRC / parts[1]).is_dir()
                                                                 or (SRC / f"{parts[1]}.py").is_file()))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_no_layer_imports_the_package_root(layer):
    """The root re-exports the top of the stack (Pipeline), so a lower layer that imports it depends on
    everything; shared facts such as the version live in modules of their own (diffusekit.version)."""
    bad = [f"{path.relative_to(SRC)} imports {name} (the package root)"
           for path in sorted((SRC / layer).rglob("*.py")) for name in _imports(path) if _reaches_root(name)]
    assert not bad, "\n".join(bad)
