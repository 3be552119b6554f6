"""The layout rules of the package (issue 13): small modules, short functions, no upward imports.

Each module is read as text and parsed; nothing is imported, so these checks are instant.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ctlens"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def _name(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_and_function_sizes(path: Path) -> None:
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, (
        f"{_name(path)} has {source.count(chr(10))} lines; split it along a real seam "
        f"(the limit is {MAX_MODULE_LINES})"
    )
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{_name(path)}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def _is_submodule(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "__init__.py"], ids=_name)
def test_no_module_imports_through_the_package_face(path: Path) -> None:
    """Inside the library, ``from ctlens import x`` may only name a submodule: a name that
    the face re-exports (``ctlens.attribute``, ``ctlens.Circuit``) would make the stage
    depend on the face, and the face's lazy loading could not hold."""
    upward = [
        f"line {node.lineno}: {alias.name}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "ctlens" and node.level == 0
        for alias in node.names
        if not _is_submodule(alias.name)
    ]
    assert not upward, f"{_name(path)} imports names from the ctlens face: {upward}"


# --- the layer order -------------------------------------------------------------------

LAYERS: tuple[tuple[str, ...], ...] = (
    # shared vocabulary and plumbing
    ("ctlens.types", "ctlens._version", "ctlens._lazy", "ctlens.dir_lock", "ctlens.files",
     "ctlens.outputs", "ctlens.run_format", "ctlens.sizes", "ctlens.memory", "ctlens.tokens",
     "ctlens.spans", "ctlens.data", "ctlens.real_shapes"),
    # the bridge's facts: hook names, model families, MLP projections
    ("ctlens.bridge", "ctlens.bridge.names", "ctlens.bridge.families", "ctlens.bridge.mlp_groups"),
    # the built-in tasks and the model zoo
    ("ctlens.tasks", "ctlens.zoo"),
    # the graph, and the bound on graphs read from files
    ("ctlens.graph_spec", "ctlens.graph", "ctlens.file_limits"),
    # models, and the hooks that read or patch a graph's nodes
    ("ctlens.model", "ctlens.model_source", "ctlens.bridge.hooks"),
    # scores
    ("ctlens.reference", "ctlens.tables", "ctlens.scores_file", "ctlens.scores",
     "ctlens.eap_kernel", "ctlens.attribution"),
    ("ctlens.circuit",),
    ("ctlens.masking",),
    # learned circuits: gates trained through the masked forward, checked by faithfulness
    ("ctlens.learning",),
    # the tuner, with its parallelism strategies (one process, data parallel, FSDP)
    ("ctlens.tuning", "ctlens.tuning.parallel"),
    # scale: the planner, the HF Trainer callback, sparse deltas
    ("ctlens.planner", "ctlens.callback", "ctlens.delta_manifest", "ctlens.delta"),
    ("ctlens.viz",),
    # the command line and the package face
    ("ctlens.cli", "ctlens.__main__", "ctlens"),
)
"""The layers of ``ctlens/``, lowest first (docs/index.md shows the same order). A module
belongs to the most specific entry naming it or a package above it (``ctlens`` itself names
the face only). A module may import from its own layer or a lower one, never from a higher
one, and no chain of imports may come back to where it started."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULE_NAMES = {_module_name(p): p for p in MODULES}


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (length of the matching entry, layer)
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            exact_only = entry == "ctlens"
            matches = module == entry or (not exact_only and module.startswith(entry + "."))
            if matches and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def _known(name: str) -> str | None:
    """The longest ctlens module that ``name`` (a module or ``module.attribute``) names."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULE_NAMES:
            return ".".join(parts)
        parts.pop()
    return None


def _imports(module: str) -> dict[str, int]:
    """Every ctlens module ``module`` imports -> the line: at the top, inside functions
    (lazy), under ``TYPE_CHECKING``, and through a lazy table (``{"name": "ctlens.x"}``)
    or a ``"ctlens.x:function"`` string (`ctlens.cli.support.lazy_runner`, the commands)."""
    path = MODULE_NAMES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Dict):
            names = [v.value.partition(":")[0] for v in node.values
                     if isinstance(v, ast.Constant) and isinstance(v.value, str)
                     and v.value.partition(":")[0] in MODULE_NAMES]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            target, colon, _ = node.value.partition(":")
            names = [target] if colon and target in MODULE_NAMES else []
        for name in names:
            target = _known(name) if name.startswith("ctlens") else None
            if target is not None and target != module:
                found.setdefault(target, node.lineno)
    return found


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in MODULE_NAMES if _layer(m) is None)
    assert not missing, f"add these modules to LAYERS in tests/test_tree_rules.py: {missing}"


def test_no_import_points_up() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) line {line} imports {target} "
        f"(layer {_layer(target)})"
        for module in sorted(MODULE_NAMES)
        for target, line in _imports(module).items()
        if (_layer(target) or 0) > (_layer(module) or 0)
    ]
    assert not upward, "imports that point up the layer order:\n" + "\n".join(upward)


def test_no_import_closes_a_circle() -> None:
    edges = {module: sorted(_imports(module)) for module in MODULE_NAMES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in edges[module]:
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (circle := visit(target)):
                return circle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (circle := visit(module)):
            pytest.fail("an import circle: " + " -> ".join(circle))


def test_the_layer_rules_catch_a_circle_and_an_upward_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The checks above would fail on the knots they were written for."""
    real = _imports
    knots = {"ctlens.graph": {"ctlens.model": 1}, "ctlens.model": {"ctlens.graph": 1}}
    monkeypatch.setitem(globals(), "_imports", lambda m: {**real(m), **knots.get(m, {})})
    with pytest.raises(AssertionError, match="ctlens.graph .* imports ctlens.model"):
        test_no_import_points_up()
    with pytest.raises(pytest.fail.Exception, match="circle"):
        test_no_import_closes_a_circle()
