"""The package's layering, checked on its source: imports run one way (no cycles), no module
reaches into another's private names, modules stay small, and docstrings stand alone."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sdm_hf"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """Absolute name of what ``from ... import`` in ``module`` refers to."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if _is_package(module) else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(module: str):
    """``(target_module, imported_name_or_None, line)`` of every import in ``module`` (at any
    depth, inside functions too), except those only made for type checkers."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    yield f"{target}.{alias.name}", None, node.lineno
                else:
                    yield target, alias.name, node.lineno


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


#: the sub-packages from the bottom up: a module imports only from its own package or lower
#: ones (type-only imports included; modules still at the top level are not ranked yet)
LAYERS = ("utils", "maths", "search", "features", "head", "training", "lm", "integrations", "evaluation")


def test_packages_import_only_downward():
    rank = {name: i for i, name in enumerate(LAYERS)}

    def layer(module: str) -> int | None:
        parts = module.split(".")
        return rank.get(parts[1]) if len(parts) > 1 else None

    upward = []
    for module, path in MODULES.items():
        own = layer(module)
        if own is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):  # every import, type-only ones too
            if isinstance(node, ast.ImportFrom):
                targets = [_resolve(module, node)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                other = layer(target) if target.startswith("sdm_hf.") else None
                if other is not None and other > own:
                    upward.append(f"{module}:{node.lineno} imports {target}")
    assert not upward, "upward imports between packages: " + "; ".join(upward)


def test_persistence_never_imports_the_head_class():
    assert not {t for t in _graph()["sdm_hf.head.serialization"] if t in ("sdm_hf.head", "sdm_hf.head.modeling")}


def test_the_maths_layer_imports_no_transformers_and_no_io():
    for module in (
        "sdm_hf.maths.activation",
        "sdm_hf.maths.similarity",
        "sdm_hf.maths.distance",
        "sdm_hf.maths.calibration",
    ):
        targets = {t.split(".")[0] for t, _, _ in _imports(module)}
        assert not targets & {"transformers", "huggingface_hub", "safetensors", "datasets", "faiss"}, module


def test_no_private_names_cross_modules():
    found = []
    for module, path in MODULES.items():
        for target, name, line in _imports(module):
            if not target.startswith("sdm_hf"):
                continue
            private_module = any(p.startswith("_") and not p.startswith("__") for p in target.split("."))
            if private_module or (name and name.startswith("_") and not name.startswith("__")):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {target} {name or ''}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by what it holds"


def test_docstrings_do_not_point_at_internal_documents():
    offenders = [
        str(p.relative_to(PACKAGE.parent))
        for p in sorted(PACKAGE.rglob("*"))
        if p.suffix in (".py", ".md") and "SPEC" in p.read_text(encoding="utf-8")
    ]
    assert not offenders, f"'SPEC' (a document users do not have) is mentioned in {offenders}"
