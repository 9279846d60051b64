"""The package's floors: imports run down, never back up.

Every module under ``src/capsnet`` is parsed with :mod:`ast` (nothing is imported), its
relative imports are resolved to package paths, and each import is checked against
:data:`FORBIDDEN`. Imports inside functions count: a lazy import still couples the floors.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "capsnet"

#: The floor of each top-level module or subpackage of ``capsnet``. ``core`` holds the leaf
#: helpers every floor may use; ``ops`` the fast operators that know nothing of capsules (the
#: convolutions, the compiled EM vote reads), below the capsule math of ``routing`` and
#: ``layers``. ``backends`` and ``_compat`` are planned by issue 15 (the speed-knob settings,
#: the private-torch shims) and are placed here so that they land on the floor it gives them.
FLOOR = {
    "functional": "core",
    "validation": "core",
    "precision": "core",
    "allocator": "core",
    "backends": "core",
    "_compat": "core",
    "_shapes": "core",
    "_slabs": "core",
    "ops": "ops",
    "routing": "routing",
    "layers": "layers",
    "models": "models",
    "data": "data",
    "train": "train",
    "viz": "viz",
    "cli": "cli",
    "__main__": "cli",
}

#: ``capsnet/__init__.py``, the public facade: only the command line sits above it.
ROOT = "root"

#: What each floor must never import. The order, bottom to top: core, ops, routing, layers,
#: models (which know no dataset), then train (models + data), viz (reads train's logs), cli.
#: ``data`` stands beside the model floors and needs none of them. ``import capsnet`` loads
#: the models, never the training stack.
FORBIDDEN = {
    "core": {"ops", "routing", "layers", "models", "data", "train", "viz", "cli", ROOT},
    "ops": {"routing", "layers", "models", "data", "train", "viz", "cli", ROOT},
    "routing": {"layers", "models", "data", "train", "viz", "cli", ROOT},
    "layers": {"models", "data", "train", "viz", "cli", ROOT},
    "models": {"data", "train", "viz", "cli", ROOT},
    "data": {"ops", "routing", "layers", "models", "train", "viz", "cli", ROOT},
    "train": {"viz", "cli", ROOT},
    "viz": {"cli", ROOT},
    "cli": set(),
    ROOT: {"data", "train", "viz", "cli"},
}

#: What ``ops`` may import of ``capsnet`` besides itself: leaf helpers, never the capsule math
#: (``functional``: squash, the losses).
OPS_MAY_IMPORT = {"validation", "precision", "backends", "_compat", "_shapes", "_slabs"}


class Import(NamedTuple):
    line: int
    target: str  # absolute dotted module name, e.g. "capsnet.routing.dynamic"


def module_name(path: Path) -> str:
    """``src/capsnet/routing/em.py`` -> ``capsnet.routing.em``; a package's ``__init__`` -> the package."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, *, is_package: bool, known: set[str]) -> list[Import]:
    """The ``capsnet`` modules that ``source`` (the text of ``module``) imports, relative ones resolved.

    ``from pkg import name`` is an import of ``pkg.name`` when that is a module in ``known``,
    else of ``pkg`` itself (``name`` is an attribute).
    """
    found = []
    for line, names, base in _statements(source, module, is_package=is_package):
        targets = names if base is None else [name if name in known else base for name in names]
        found += [Import(line, t) for t in dict.fromkeys(targets) if t.split(".")[0] == "capsnet"]
    return sorted(found, key=lambda imp: imp.line)  # ast.walk is breadth-first


def _statements(source: str, module: str, *, is_package: bool):
    """``(line, dotted names, base)`` per import statement: ``import a.b`` gives ``a.b`` (base None),
    ``from X import n`` gives ``X.n`` with base ``X`` (a relative ``X`` resolved)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield node.lineno, [alias.name for alias in node.names], None
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, module, is_package=is_package)
            yield node.lineno, [f"{base}.{a.name}" for a in node.names], base


def _from_base(node: ast.ImportFrom, module: str, *, is_package: bool) -> str:
    """The absolute module of ``from X import ...`` in ``module``, a relative ``X`` resolved."""
    if not node.level:
        return node.module
    package = module if is_package else module.rpartition(".")[0]
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        raise ValueError(f"{module} line {node.lineno}: relative import goes above the top package")
    return ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))


def private_names(source: str, module: str, *, is_package: bool, owner: str) -> list[Import]:
    """The private names of package ``owner`` that ``source`` imports: ``_name`` attributes or modules on the dotted path.

    ``from capsnet.routing.dynamic import _route`` gives ``capsnet.routing.dynamic._route``;
    ``from ..routing._em_votes import VoteReader`` gives ``capsnet.routing._em_votes.VoteReader``.
    """
    found = []
    for line, targets, _ in _statements(source, module, is_package=is_package):
        for target in targets:
            inside = target.split(".")[len(owner.split(".")) :]
            if (target + ".").startswith(owner + ".") and any(p.startswith("_") and not p.endswith("__") for p in inside):
                found.append(Import(line, target))
    return sorted(found, key=lambda imp: imp.line)


def floor_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT
    if parts[1] not in FLOOR:
        raise AssertionError(f"{module} is on no floor: give {parts[1]!r} one in FLOOR (tests/test_layering.py)")
    return FLOOR[parts[1]]


def violations(source: str, module: str, *, path: str, is_package: bool, known: set[str]) -> list[str]:
    """One line per import in ``source`` that runs up a floor: file, line, the forbidden import."""
    floor = floor_of(module)
    return [
        f"{path}:{imp.line}: {module} ({floor}) imports {imp.target} ({floor_of(imp.target)}); "
        f"{floor} must never import {sorted(FORBIDDEN[floor])}"
        for imp in imports(source, module, is_package=is_package, known=known)
        if floor_of(imp.target) in FORBIDDEN[floor]
    ]


FILES = sorted(PACKAGE.rglob("*.py"))
KNOWN = {module_name(p) for p in FILES}


def _check(path: Path) -> list[str]:
    return violations(
        path.read_text(),
        module_name(path),
        path=str(path.relative_to(SRC.parent)),
        is_package=path.name == "__init__.py",
        known=KNOWN,
    )


def test_every_module_sits_on_a_known_floor():
    unplaced = sorted({m.split(".")[1] for m in KNOWN if "." in m} - FLOOR.keys())
    assert not unplaced, f"place these in tests/test_layering.py FLOOR and FORBIDDEN: {unplaced}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up_a_floor(path):
    found = _check(path)
    assert not found, "\n".join(found)


def test_ops_import_no_capsule_math():
    found = [
        f"{path.relative_to(SRC.parent)}:{imp.line}: imports {imp.target}"
        for path in FILES
        if module_name(path).split(".")[1:2] == ["ops"]
        for imp in imports(path.read_text(), module_name(path), is_package=path.name == "__init__.py", known=KNOWN)
        if imp.target.split(".")[1] not in OPS_MAY_IMPORT | {"ops"}
    ]
    assert not found, "\n".join(found)


def test_nothing_outside_routing_imports_a_private_name_of_routing():
    # The fast paths of routing (hand-written backwards, vote slabs) stay behind its public
    # functions: a module over routing calls dense_routing, never _DenseRouting or _route.
    found = [
        f"{path.relative_to(SRC.parent)}:{imp.line}: imports {imp.target}"
        for path in FILES
        if module_name(path).split(".")[1:2] != ["routing"]
        for imp in private_names(path.read_text(), module_name(path), is_package=path.name == "__init__.py", owner="capsnet.routing")
    ]
    assert not found, "\n".join(found) + "\nmake what they need public in capsnet.routing, or keep it there"


# The checkers themselves, on synthetic sources: they must be able to fail.

KNOWN_SYNTHETIC = {
    "capsnet",
    "capsnet.functional",
    "capsnet.layers",
    "capsnet.layers.dense",
    "capsnet.routing",
    "capsnet.routing.dynamic",
    "capsnet.train",
    "capsnet.train.loop",
}


def _synthetic(source: str, module: str, *, is_package: bool = False) -> list[str]:
    return violations(source, module, path="src/capsnet/x.py", is_package=is_package, known=KNOWN_SYNTHETIC)


def test_checker_names_file_line_and_import_of_a_relative_upward_import():
    found = _synthetic("import torch\n\nfrom ..layers import DenseCaps\n", "capsnet.routing.dynamic")
    assert len(found) == 1
    assert found[0].startswith("src/capsnet/x.py:3: capsnet.routing.dynamic (routing) imports capsnet.layers (layers)")


def test_checker_flags_absolute_and_function_local_imports():
    source = "def f():\n    import capsnet.train.loop\n    from capsnet.layers.dense import DenseCaps\n"
    found = _synthetic(source, "capsnet.routing.dynamic")
    assert [line.split(": ")[0] for line in found] == ["src/capsnet/x.py:2", "src/capsnet/x.py:3"]
    assert "imports capsnet.train.loop (train)" in found[0]
    assert "imports capsnet.layers.dense (layers)" in found[1]


def test_checker_flags_an_import_of_the_package_root():
    found = _synthetic("from .. import __version__\n", "capsnet.layers.dense")
    assert len(found) == 1 and "imports capsnet (root)" in found[0]


def test_checker_allows_imports_down_and_across_a_floor():
    source = "from ..routing.dynamic import dynamic_routing\nfrom ..functional import squash\nfrom . import dense\n"
    assert _synthetic(source, "capsnet.layers", is_package=True) == []


def test_relative_imports_resolve_to_package_paths():
    source = "from . import dense\nfrom .. import functional, squash\nfrom ..routing.dynamic import x\n"
    found = imports(source, "capsnet.layers", is_package=True, known=KNOWN_SYNTHETIC)
    assert [i.target for i in found] == ["capsnet.layers.dense", "capsnet.functional", "capsnet", "capsnet.routing.dynamic"]
    found = imports("from . import dense\n", "capsnet.layers.other", is_package=False, known=KNOWN_SYNTHETIC)
    assert [i.target for i in found] == ["capsnet.layers.dense"]


def test_private_name_checker_flags_underscore_names_and_modules_of_routing():
    source = (
        "from ..routing.dynamic import RoutingResult, _route\n"
        "from capsnet.routing._em_votes import VoteReader\n"
        "import capsnet.routing._em_engine\n"
        "from ..routing import dense_routing, __all__\n"
        "from ..functional import _private_but_not_routing\n"
    )
    found = private_names(source, "capsnet.layers.dense", is_package=False, owner="capsnet.routing")
    assert [(i.line, i.target) for i in found] == [
        (1, "capsnet.routing.dynamic._route"),
        (2, "capsnet.routing._em_votes.VoteReader"),
        (3, "capsnet.routing._em_engine"),
    ]


def test_private_name_checker_resolves_relative_imports_inside_routing():
    found = private_names("from .dynamic import _route\n", "capsnet.routing.dense", is_package=False, owner="capsnet.routing")
    assert [i.target for i in found] == ["capsnet.routing.dynamic._route"]  # the test skips routing's own modules
    assert private_names("from .routing import dense_routing\n", "capsnet", is_package=True, owner="capsnet.routing") == []
