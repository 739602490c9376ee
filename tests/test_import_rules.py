"""The import rules of strataprune, read from the source with ``ast`` (nothing is imported or run).

Every module under ``strataprune/`` is parsed and every import statement counts, those inside functions and
methods included: a lazy import is still a dependency, only a later one. Imports under ``if TYPE_CHECKING:`` are
left out: they never run and only name types for the type checker (the contract uses them to name torch types
without loading torch).

The rules (each violation reads ``file:line: rule: what``):

1. ``contract``: the contract (``strataprune/contract/``) imports nothing else of the package.
2. ``plugin``: a plugin module (``strataprune/plugins/<kind>/...``) imports only the contract, its own kind's
   folder and ``strataprune/plugins/common/`` (helpers several kinds share); backends (``plugins/backends``) may
   also use ``strataprune.deploy`` and ``strataprune.kernels``, the host libraries a backend drives.
   ``plugins/common`` itself imports only the contract and ``plugins/common``.
3. ``plugin-imports-plugin``: no module under ``plugins/`` imports a plugin, i.e. a module its kind's
   ``__init__.py`` registers (shared code lives in the kind's helper modules or in ``plugins/common``).
   ``host-imports-plugin``: nothing outside ``plugins/`` imports anything under ``plugins/``; the host reaches
   plugins through the registry, which names the built-in packages as strings.
4. ``package-root``: nothing imports the package root ``strataprune/__init__.py``: no ``from strataprune import X``
   (relative ones included), no bare ``import strataprune``, and no ``strataprune.X`` where ``X`` is not a
   submodule after ``import strataprune.sub``. The root only serves users; the version lives in
   ``strataprune.version``.
5. ``private-name``: no ``_name`` is imported across a module boundary (``from m import _x`` or ``m._x`` on an
   imported module ``m``), except a private module (``pkg/_mod.py``) by the modules of its own package ``pkg``.
   Dunder names (``__version__``) are public. Tests are not scanned, so they may reach private names.
6. ``circle``: the module graph has no circle. An import of ``a.b.c`` is an edge to ``a.b.c`` only: the parent
   packages' ``__init__`` runs too, but counting it would make every package that re-exports its submodules a
   circle with each of them.
7. ``contract-light``: a contract module imports no heavy library (``HEAVY``: torch, transformers, ...) at module
   level, so recipes and argument checks that import the contract stay fast; inside functions it may.
8. ``testing``: ``strataprune.testing`` (the contract checks for plugin authors) is the contract's companion: it may
   import the contract and the host pieces it runs a plugin with (``engine``, ``deploy``, ``models``, ``data``,
   ``evaluate``, ``runtime``, ``kernels``, ``version``), never a plugin, ``commands``, ``cli`` or ``leaderboard``;
   nothing in the package imports it (plugin authors' tests and our tests do).

``KNOWN_ENGINE_VIOLATIONS`` lists, exactly, the violations inside ``strataprune/engine/`` (or naming an engine
module) that wait for the engine's single run sequence; every other violation fails the test.

Rules 2 and 3 include what an older check in the pipeline tests asserted (the host imports no plugin; no allocator
imports a pruner). Not seen: imports by ``importlib.import_module`` (the registry names the built-in plugin
packages as strings on purpose; lazy ``__getattr__`` re-exports in ``contract/__init__.py`` and
``kernels/__init__.py`` name their own package's modules) and private attributes of objects (``pipe._x``).
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "strataprune"
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout whose package these tests check

# The engine's own violations while it was being folded into one run sequence were tolerated here; the refactor
# landed and left none. Each entry would be exactly one violation without its line number (``file: rule: what``);
# an entry that no longer occurs fails ``test_known_engine_violations_still_occur``, so the list only shrinks.
KNOWN_ENGINE_VIOLATIONS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Import:
    """What one statement loads from one package module: ``from a import b, c`` (b, c names of a) is one,
    ``import a.b, a.c`` is two."""

    file: str  # path relative to the checkout, for messages
    line: int
    importer: str  # dotted name of the importing module
    source: str  # the module named after ``from`` (resolved if relative), or the dotted name of ``import``
    target: str  # the package module this loads (``from m import sub``, sub a module: m.sub)
    names: tuple[str, ...]  # the names taken from ``target``; () when a module itself is imported

    @property
    def what(self) -> str:
        return f"{', '.join(self.names)} from {self.target}" if self.names else self.target


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    rule: str
    what: str

    @property
    def key(self) -> str:
        """The violation without its line number, as ``KNOWN_ENGINE_VIOLATIONS`` lists it."""
        return f"{self.file}: {self.rule}: {self.what}"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule}: {self.what}"


def module_name(path: str) -> str:
    """``strataprune/a/b.py`` -> ``strataprune.a.b``; ``strataprune/a/__init__.py`` -> ``strataprune.a``."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


class _ImportReader(ast.NodeVisitor):
    """Collects a module's package imports (skipping ``if TYPE_CHECKING:`` bodies) and its attribute chains."""

    def __init__(self, file: str, module: str, is_package: bool, modules: set[str]) -> None:
        self.file, self.module, self.modules = file, module, modules
        self.package = module if is_package else module.rpartition(".")[0]
        self.imports: list[Import] = []
        self.bound: dict[str, str] = {}  # local name -> package module it is bound to by an import
        self.chains: list[tuple[int, str, list[str]]] = []  # (line, head name, attribute parts)
        self.heavy: list[tuple[int, str]] = []  # (line, module) for module-level imports of HEAVY libraries
        self.function_depth = 0

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def note_heavy(self, line: int, module: str) -> None:
        if not self.function_depth and module.partition(".")[0] in HEAVY:
            self.heavy.append((line, module))

    def known(self, dotted: str) -> str:
        """The longest prefix of ``dotted`` that is a module of the package."""
        parts = dotted.split(".")
        while parts and ".".join(parts) not in self.modules:
            parts.pop()
        return ".".join(parts) or dotted

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.note_heavy(node.lineno, alias.name)
            if not under(alias.name, PACKAGE):
                continue
            target = self.known(alias.name)
            self.imports.append(Import(self.file, node.lineno, self.module, alias.name, target, ()))
            if alias.asname:
                self.bound[alias.asname] = target
            else:
                self.bound[alias.name.partition(".")[0]] = PACKAGE

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
            self.note_heavy(node.lineno, source)
        if not under(source, PACKAGE):
            return
        names: list[str] = []
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in self.modules:
                self.imports.append(Import(self.file, node.lineno, self.module, source, submodule, ()))
                self.bound[alias.asname or alias.name] = submodule
            else:
                names.append(alias.name)
        if names:
            self.imports.append(Import(self.file, node.lineno, self.module, source, self.known(source), tuple(names)))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts: list[str] = []
        inner: ast.expr = node
        while isinstance(inner, ast.Attribute):
            parts.append(inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name):
            self.chains.append((node.lineno, inner.id, parts[::-1]))
            return  # the inner attributes are prefixes of this chain
        self.generic_visit(node)


@dataclass
class ModuleImports:
    file: str
    module: str
    imports: list[Import]
    uses: list[tuple[int, str, str]]  # (line, module, attribute) for ``alias.attr`` on an imported package module
    heavy: list[tuple[int, str]]  # module-level imports of HEAVY libraries


def read_imports(sources: dict[str, str]) -> dict[str, ModuleImports]:
    """Module name -> its package imports, from ``{"strataprune/x/y.py": source text}``."""
    modules = {module_name(path) for path in sources}
    result = {}
    for path, text in sorted(sources.items()):
        module = module_name(path)
        reader = _ImportReader(path, module, path.endswith("/__init__.py"), modules)
        reader.visit(ast.parse(text, filename=path))
        uses = []
        for line, head, parts in reader.chains:
            if head not in reader.bound:
                continue
            current = reader.bound[head]
            for part in parts:  # walk down submodules; the first non-module part is a name of ``current``
                uses.append((line, current, part))
                if f"{current}.{part}" not in modules:
                    break
                current = f"{current}.{part}"
        result[module] = ModuleImports(path, module, reader.imports, uses, reader.heavy)
    return result


def plugin_kind(module: str) -> str | None:
    """``strataprune.plugins.<kind>...`` -> kind (``common`` included); None outside a kind's folder."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == [PACKAGE, "plugins"] else None


def allowed_for_plugin(kind: str) -> tuple[str, ...]:
    allowed = [f"{PACKAGE}.contract", f"{PACKAGE}.plugins.{kind}", f"{PACKAGE}.plugins.common"]
    if kind == "backends":
        allowed += [f"{PACKAGE}.deploy", f"{PACKAGE}.kernels"]
    return tuple(allowed)


#: libraries that take seconds to import: the contract loads them inside functions or for the type checker only
HEAVY = frozenset({"torch", "transformers", "onnxruntime", "onnx", "safetensors", "tqdm", "datasets", "scipy", "matplotlib"})
TESTING_MAY_IMPORT = tuple(
    f"{PACKAGE}.{room}"
    for room in ("contract", "engine", "deploy", "models", "data", "evaluate", "runtime", "kernels", "version")
)


def registered_plugins(graph: dict[str, ModuleImports]) -> set[str]:
    """The plugin modules: those a kind's ``__init__`` (the entry point) imports from its own folder."""
    plugins = set()
    for module, info in graph.items():
        kind = plugin_kind(module)
        if kind and kind != "common" and module == f"{PACKAGE}.plugins.{kind}":
            plugins |= {i.target for i in info.imports if under(i.target, module) and i.target != module}
    return plugins


def check_edges(graph: dict[str, ModuleImports]) -> list[Violation]:
    """Rules 1-5, 7 and 8, one import (or attribute use) at a time."""
    plugins = registered_plugins(graph)
    found: list[Violation] = []
    for module, info in graph.items():
        kind = plugin_kind(module)
        is_plugin_root = module == f"{PACKAGE}.plugins" or (kind and module == f"{PACKAGE}.plugins.{kind}")
        for imp in info.imports:
            target = imp.target

            def report(rule: str, what: str) -> None:
                found.append(Violation(info.file, imp.line, rule, what))

            if imp.source == PACKAGE:
                report("package-root", f"imports {imp.what} through the package root (import it from its own module)")
            if under(module, f"{PACKAGE}.contract") and not under(target, f"{PACKAGE}.contract"):
                report("contract", f"the contract imports {imp.what}")
            if kind and not any(under(target, allowed) for allowed in allowed_for_plugin(kind)):
                allowed = ", ".join(allowed_for_plugin(kind))
                report("plugin", f"plugins/{kind} imports {imp.what}; allowed: {allowed}")
            if kind and target in plugins and target != module and not is_plugin_root:
                report("plugin-imports-plugin", f"imports {imp.what}, a plugin module")
            if not kind and module != f"{PACKAGE}.plugins" and under(target, f"{PACKAGE}.plugins"):
                report("host-imports-plugin", f"imports {imp.what}; the host reaches plugins through the registry")
            if module == f"{PACKAGE}.testing" and not any(under(target, room) for room in TESTING_MAY_IMPORT):
                report("testing", f"strataprune.testing imports {imp.what}")
            if target == f"{PACKAGE}.testing" and module != target:
                report("testing", "imports strataprune.testing, which only tests use")
            private = [name for name in imp.names if is_private(name)]
            if private and target != module:
                report("private-name", f"imports {', '.join(private)} from {target}")
            private_module = next((p for p in target.split(".") if is_private(p)), None)
            if private_module and not under(module, target.partition(f".{private_module}")[0]):
                report("private-name", f"imports the private module {target} from outside its package")
        if under(module, f"{PACKAGE}.contract"):
            for line, heavy in info.heavy:
                found.append(Violation(info.file, line, "contract-light", f"imports {heavy} at module level"))
        for line, owner, attribute in info.uses:
            used = f"{owner}.{attribute}"
            if owner == PACKAGE and used not in graph:
                found.append(Violation(info.file, line, "package-root", f"uses {used} from the package root"))
            if is_private(attribute) and owner != module and not (used in graph and under(module, owner)):
                found.append(Violation(info.file, line, "private-name", f"uses {used}"))
    return found


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def check_circles(graph: dict[str, ModuleImports]) -> list[Violation]:
    """Rule 6: one violation per circle (strongly connected set of modules), at the first import of its shortest
    loop through its alphabetically first module."""
    edges: dict[str, set[str]] = {m: set() for m in graph}
    first_line: dict[tuple[str, str], int] = {}
    for module, info in graph.items():
        for imp in info.imports:
            if imp.target != module and imp.target in graph:
                edges[module].add(imp.target)
                key = (module, imp.target)
                first_line[key] = min(first_line.get(key, imp.line), imp.line)
    found = []
    for component in strongly_connected(edges):
        if len(component) < 2:
            continue
        members, start = set(component), component[0]
        previous: dict[str, str] = {}
        queue = deque([start])
        while queue and start not in previous:  # breadth first: the shortest way back to ``start``
            node = queue.popleft()
            for child in sorted(edges[node] & members):
                if child not in previous:
                    previous[child] = node
                    queue.append(child)
        loop = [start]
        while (loop[-1] != start) or len(loop) == 1:
            loop.append(previous[loop[-1]])
        loop.reverse()  # start -> ... -> start
        what = " -> ".join(loop)
        rest = sorted(members - set(loop))
        if rest:
            what += f" (the circle also takes in {', '.join(rest)})"
        found.append(Violation(graph[start].file, first_line[(start, loop[1])], "circle", what))
    return found


def check(sources: dict[str, str]) -> list[Violation]:
    graph = read_imports(sources)
    return sorted(check_edges(graph) + check_circles(graph), key=lambda v: (v.file, v.line, v.rule, v.what))


def package_sources() -> dict[str, str]:
    return {
        path.relative_to(SOURCE_ROOT).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted((SOURCE_ROOT / PACKAGE).rglob("*.py"))
    }


@pytest.fixture(scope="module")
def violations() -> list[Violation]:
    return check(package_sources())


def test_the_package_keeps_the_import_rules(violations: list[Violation]) -> None:
    unexpected = [str(v) for v in violations if v.key not in KNOWN_ENGINE_VIOLATIONS]
    assert unexpected == [], "import rules broken (see this test's docstring):\n" + "\n".join(unexpected)


def test_known_engine_violations_still_occur(violations: list[Violation]) -> None:
    """The allowlist only shrinks: an entry whose violation is gone must be deleted."""
    stale = sorted(KNOWN_ENGINE_VIOLATIONS - {v.key for v in violations})
    assert stale == [], "fixed, delete from KNOWN_ENGINE_VIOLATIONS:\n" + "\n".join(stale)


def test_the_allowlist_holds_only_engine_violations() -> None:
    """Everything outside the engine is fixed, not listed: each entry is in engine/ or names an engine module."""
    outside = [
        key for key in KNOWN_ENGINE_VIOLATIONS if not key.startswith(f"{PACKAGE}/engine/") and f"{PACKAGE}.engine." not in key
    ]
    assert outside == []


def test_the_scan_sees_the_whole_package() -> None:
    """Guards the checker against reading nothing: the package has its rooms, and imports are found inside
    functions (the plugin kinds' registration hooks import their plugins lazily)."""
    graph = read_imports(package_sources())
    rooms = {m.split(".")[1] for m in graph if m.count(".") >= 1}
    assert {"contract", "plugins", "engine", "deploy", "leaderboard", "commands"} <= rooms
    assert f"{PACKAGE}.plugins.allocators.uniform" in registered_plugins(graph)
    assert sum(len(info.imports) for info in graph.values()) > 300


# ---------------------------------------------------------------- the checker on planted violations
PLANTED = {
    "strataprune/__init__.py": "from strataprune.version import __version__\n",
    "strataprune/version.py": "__version__ = '0'\n",
    "strataprune/contract/__init__.py": "import torch.nn\n\ndef lazy():\n    import transformers\n",
    "strataprune/contract/base.py": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from strataprune.engine.pipeline import Pipeline\n"  # skipped: type checking only
        "def reference():\n"
        "    from strataprune.plugins.backends.torch import TorchBackend\n"  # line 5: contract -> plugin
        "    return TorchBackend\n"
    ),
    "strataprune/engine/__init__.py": "",
    "strataprune/engine/pipeline.py": "from strataprune.contract.base import reference\nfrom .report import write\n",
    "strataprune/engine/report.py": "from strataprune import version\n\ndef write():\n    from . import pipeline\n",
    "strataprune/plugins/__init__.py": "",
    "strataprune/plugins/common/__init__.py": "",
    "strataprune/plugins/common/cka.py": "def cka():\n    pass\n",
    "strataprune/plugins/allocators/__init__.py": "def register_allocators(register):\n    from .rmi import RMI\n",
    "strataprune/plugins/allocators/rmi.py": "from strataprune.plugins.common.cka import cka\n",
    "strataprune/plugins/recovery/__init__.py": "def register_recoveries(register):\n    from .losa import LoSA\n",
    "strataprune/plugins/recovery/losa.py": (
        "from strataprune.contract.base import reference\n"
        "from strataprune.plugins.allocators.rmi import schedule\n"  # line 2: plugin -> other kind's plugin
        "from strataprune.data.images import _ImageSpec\n"  # line 3: plugin -> data, and a private name
    ),
    "strataprune/plugins/backends/__init__.py": "def register_backends(register):\n    from . import torch, sparse_cpu\n",
    "strataprune/plugins/backends/torch.py": "import strataprune.deploy.rundir as rundir\nrundir._load()\n",
    "strataprune/plugins/backends/sparse_cpu.py": "from strataprune.plugins.backends.torch import TorchBackend\n",
    "strataprune/kernels/__init__.py": "from strataprune.kernels._library import available\n",
    "strataprune/kernels/_library.py": "",
    "strataprune/deploy/__init__.py": "",
    "strataprune/deploy/rundir.py": "import strataprune.kernels._library\nimport strataprune.kernels\nstrataprune.version\n",
    "strataprune/data/__init__.py": "",
    "strataprune/data/images.py": "import strataprune.kernels\nstrataprune.Recipe\n",
    "strataprune/testing.py": "from strataprune.leaderboard import columns\n",
    "strataprune/leaderboard/__init__.py": "",
    "strataprune/leaderboard/columns.py": "",
    "strataprune/leaderboard/render.py": "import strataprune.testing\n",
}


def test_the_checker_finds_planted_violations() -> None:
    """Every rule fires on a small in-memory package, at the right line; the import under TYPE_CHECKING does not."""
    found = [str(v) for v in check(PLANTED)]
    assert found == [
        "strataprune/contract/__init__.py:1: contract-light: imports torch.nn at module level",
        "strataprune/contract/base.py:5: contract: the contract imports TorchBackend from strataprune.plugins.backends.torch",
        "strataprune/contract/base.py:5: host-imports-plugin: imports TorchBackend from strataprune.plugins.backends.torch;"
        " the host reaches plugins through the registry",
        "strataprune/data/images.py:2: package-root: uses strataprune.Recipe from the package root",
        "strataprune/deploy/rundir.py:1: private-name: imports the private module strataprune.kernels._library"
        " from outside its package",
        "strataprune/engine/pipeline.py:2: circle: strataprune.engine.pipeline -> strataprune.engine.report"
        " -> strataprune.engine.pipeline",
        "strataprune/engine/report.py:1: package-root: imports strataprune.version through the package root"
        " (import it from its own module)",
        "strataprune/leaderboard/render.py:1: testing: imports strataprune.testing, which only tests use",
        "strataprune/plugins/backends/sparse_cpu.py:1: plugin-imports-plugin: imports TorchBackend from"
        " strataprune.plugins.backends.torch, a plugin module",
        "strataprune/plugins/backends/torch.py:2: private-name: uses strataprune.deploy.rundir._load",
        "strataprune/plugins/recovery/losa.py:2: plugin: plugins/recovery imports schedule from"
        " strataprune.plugins.allocators.rmi;"
        " allowed: strataprune.contract, strataprune.plugins.recovery, strataprune.plugins.common",
        "strataprune/plugins/recovery/losa.py:2: plugin-imports-plugin: imports schedule from"
        " strataprune.plugins.allocators.rmi, a plugin module",
        "strataprune/plugins/recovery/losa.py:3: plugin: plugins/recovery imports _ImageSpec from strataprune.data.images;"
        " allowed: strataprune.contract, strataprune.plugins.recovery, strataprune.plugins.common",
        "strataprune/plugins/recovery/losa.py:3: private-name: imports _ImageSpec from strataprune.data.images",
        "strataprune/testing.py:1: testing: strataprune.testing imports strataprune.leaderboard.columns",
    ]


def test_a_clean_package_passes_and_one_planted_import_fails_it() -> None:
    """The checker is quiet on code that keeps the rules, so a failure above means a real violation."""
    clean = {path: text for path, text in PLANTED.items() if path.startswith(("strataprune/contract/", "strataprune/plugins/"))}
    clean["strataprune/contract/__init__.py"] = "def lazy():\n    import torch\n"
    clean["strataprune/contract/base.py"] = "from strataprune.contract import errors\n"
    clean["strataprune/contract/errors.py"] = ""
    clean["strataprune/plugins/recovery/losa.py"] = "from strataprune.plugins.common.cka import cka\n"
    clean["strataprune/plugins/backends/sparse_cpu.py"] = "from strataprune.contract.base import errors\n"
    clean["strataprune/plugins/backends/torch.py"] = ""
    assert check(clean) == []
    clean["strataprune/plugins/allocators/rmi.py"] += "def allocate():\n    from strataprune.plugins.recovery import losa\n"
    assert [str(v) for v in check(clean)] == [
        "strataprune/plugins/allocators/rmi.py:3: plugin: plugins/allocators imports strataprune.plugins.recovery.losa;"
        " allowed: strataprune.contract, strataprune.plugins.allocators, strataprune.plugins.common",
        "strataprune/plugins/allocators/rmi.py:3: plugin-imports-plugin: imports strataprune.plugins.recovery.losa,"
        " a plugin module",
    ]
