"""The import graph stands in floors: each package imports only the packages below it (the table
below), no module imports back into a circle, the platform core and the contract stay light, and
no infrastructure code imports torch. Read from the sources with `ast`; nothing is imported."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Who may import whom, among the repository's own packages (a name is a package, or one module
# of one: `kiln.contract`). Everything not listed for a package is a floor above it.
ALLOWED: dict[str, frozenset[str]] = {
    # The platform core: settings, config, naming, GPU catalog, contract.
    "kiln": frozenset(),
    # The event schema and producer: the inference image carries them without the rest of kiln.
    "kiln_events": frozenset({"kiln.contract"}),
    # Constructs, and the deploy-time payloads they apply.
    "platform_constructs": frozenset({"kiln", "kiln_events"}),
    "stacks": frozenset({"kiln", "platform_constructs"}),
    # Post-synth analysis reads templates, never the stacks that wrote them.
    "kiln_policy": frozenset({"kiln"}),
    # The CDK app.
    "app": frozenset({"kiln", "stacks"}),
    # The operator tool sits on top of everything of the platform.
    "kiln_cli": frozenset({"kiln", "kiln_events", "kiln_policy", "platform_constructs", "stacks"}),
    # Workloads: of the platform, only the contract and the event package.
    "kernels": frozenset(),
    "modeling": frozenset({"kernels", "kiln.contract"}),
    # kiln.registry: a finished run registers itself (standard library and the contract only).
    "training": frozenset({"kernels", "modeling", "kiln.contract", "kiln.registry"}),
    "inference": frozenset({"kernels", "modeling", "training", "kiln.contract", "kiln_events"}),
    "scripts": frozenset({"kiln_events", "kiln.contract"}),
}
INFRASTRUCTURE = ("kiln", "kiln_events", "kiln_cli", "kiln_policy", "platform_constructs", "stacks")
INFRASTRUCTURE += ("app",)
# The core runs where the CDK, AWS clients and torch may be absent (the images, `kiln envs`).
CORE_FORBIDDEN = ("aws_cdk", "constructs", "cdk_nag", "boto3", "botocore", "torch")
FIRST_PARTY = frozenset(ALLOWED)


def _modules(package: str) -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) of every module of a package, or of a top-level script."""
    path = REPO / package
    if path.is_dir():
        for file in sorted(path.rglob("*.py")):
            if any(part in ("build", "__pycache__") for part in file.parts):
                continue
            parts = file.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, file
    elif path.with_suffix(".py").is_file():
        yield package, path.with_suffix(".py")


MODULES: dict[str, Path] = {name: file for p in ALLOWED for name, file in _modules(p)}


def _resolve(module: str, name: str | None = None) -> str:
    """`from module import name` names a submodule when one exists, else the module itself."""
    if name and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module


def imports(module: str) -> set[str]:
    """Every module `module` imports (top-level and inside functions), absolute, resolved to a
    first-party module where it is one; imports under `if TYPE_CHECKING:` are left out."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(child) for child in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = module.split(".")
                if MODULES[module].name != "__init__.py":
                    package = package[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            found |= {_resolve(base, alias.name) for alias in node.names}
    return found


def _package(module: str) -> str:
    return module.split(".")[0]


def _allowed(importer: str, target: str) -> bool:
    if _package(target) == _package(importer):
        return True
    return any(target == a or target.startswith(f"{a}.") for a in ALLOWED[_package(importer)])


def test_every_package_imports_only_the_floors_below_it() -> None:
    upward = sorted(
        f"{module} imports {target}"
        for module in MODULES
        for target in imports(module)
        if _package(target) in FIRST_PARTY and not _allowed(module, target)
    )
    assert not upward, "imports that run back up a floor:\n" + "\n".join(upward)


def test_the_floors_themselves_form_no_circle() -> None:
    order: list[str] = []
    remaining = {p: {_package(a) for a in allowed} for p, allowed in ALLOWED.items()}
    while remaining:
        ready = sorted(p for p, below in remaining.items() if below <= set(order))
        assert ready, f"the allowed table has a circle among {sorted(remaining)}"
        order += ready
        for p in ready:
            del remaining[p]


def test_no_module_imports_in_a_circle() -> None:
    graph = {m: {t for t in imports(m) if t in MODULES and t != m} for m in MODULES}
    circles: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("package", INFRASTRUCTURE)
def test_infrastructure_never_imports_torch(package: str) -> None:
    offenders = sorted(
        m
        for m in MODULES
        if _package(m) == package and any(_package(t) == "torch" for t in imports(m))
    )
    assert not offenders


def test_the_core_needs_no_cdk_aws_client_or_torch() -> None:
    offenders = sorted(
        f"{m} imports {t}"
        for m in MODULES
        if _package(m) == "kiln"
        for t in imports(m)
        if _package(t) in CORE_FORBIDDEN
    )
    assert not offenders


def test_the_contract_imports_only_the_standard_library() -> None:
    third_party = {
        t for t in imports("kiln.contract") if _package(t) not in sys.stdlib_module_names
    }
    assert third_party <= {"__future__"}


def test_the_table_names_every_top_level_package() -> None:
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages <= set(ALLOWED), f"add {sorted(packages - set(ALLOWED))} to ALLOWED"


def test_the_readme_layout_has_one_row_per_top_level_folder() -> None:
    text = (REPO / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \|$", text, re.M)
    named = [path.rstrip("/") for path, _ in rows]
    assert len(named) == len(set(named)), "a path has two rows"
    generated = {"node_modules", "cdk.out", "__pycache__"}
    folders = {
        p.name
        for p in REPO.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and p.name not in generated
        and not p.name.endswith(".egg-info")
    }
    assert folders <= set(named), f"README's Layout lacks {sorted(folders - set(named))}"
