"""The repository's layout rules, checked on the source text alone.

engine/ and kernels/ are parsed with :mod:`ast` (nothing is imported), so a rule that breaks is reported
even when the package no longer imports. Each failure names the file and the culprit:

- every relative import names a module of the project (one inside a function fails only when it runs);
- no import cycle between modules (every import counts, those inside functions too; an
  ``if TYPE_CHECKING:`` block does not);
- no module imports a package above it (a name taken from an ancestor package's ``__init__``);
- no private name (leading underscore, not a dunder) imported from another module of the project;
- no ``.py`` file in engine/ over 450 lines;
- kernels/ never imports engine/, and no kernel module imports ``kernels.aot``;
- the README stays a front door (at most 160 lines), and every relative link in README.md and docs/*.md
  reaches an existing file and, where it names one, an existing heading.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels")
INSTALLED_PREFIX = "tritonforge."
MAX_ENGINE_LINES = 450
MAX_README_LINES = 160


@dataclass(frozen=True)
class Import:
    """One import of a project module: who imports what, from where in the source."""

    importer: str  # dotted module name of the importing file
    target: str  # dotted module name the import executes
    names: tuple[str, ...]  # names taken from the target (empty for ``import x`` or a submodule)
    line: int


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the project's packages."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _rel(module: str) -> str:
    return MODULES[module].relative_to(ROOT).as_posix()


def _project_name(name: str) -> str | None:
    """The project module an absolute dotted name refers to (longest known prefix), or None."""
    if name.startswith(INSTALLED_PREFIX):
        name = name[len(INSTALLED_PREFIX):]
    if name.split(".")[0] not in PACKAGES:
        return None
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, leaving out the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports_of(module: str) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    found: list[Import] = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _project_name(alias.name)
                if target is not None:
                    found.append(Import(module, target, (), node.lineno))
            continue
        if node.level:
            package = module if _is_package(module) else module.rpartition(".")[0]
            parts = package.split(".")
            if node.level - 1 >= len(parts):
                continue  # above the project's packages: not a project module
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            source = f"{base}.{node.module}" if node.module else base
            if source not in MODULES:
                continue
        else:
            source = _project_name(node.module or "")
            if source is None:
                continue
        names: list[str] = []
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in MODULES:  # ``from . import x`` with x a submodule: an import of x
                found.append(Import(module, submodule, (), node.lineno))
            else:
                names.append(alias.name)
        if names:
            found.append(Import(module, source, tuple(names), node.lineno))
    return found


IMPORTS: list[Import] = [imp for module in MODULES for imp in _imports_of(module)]


def _where(imp: Import) -> str:
    return f"{_rel(imp.importer)}:{imp.line}"


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(len(parts) - 1, 0, -1)]


def _cycles() -> list[list[str]]:
    """Strongly connected components of the import graph with more than one module (or a self-import)."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in IMPORTS:
        if imp.target != imp.importer:  # a module's import of itself (as ``__main__``) is no cycle
            graph[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    for start in sorted(graph):
        if start in index:
            continue
        # iterative Tarjan: (node, iterator over its successors)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def _shortest_cycle(start: str, members: set[str]) -> list[Import]:
    """The shortest chain of imports inside ``members`` that leads from ``start`` back to it."""
    first: dict[str, Import] = {}
    for imp in sorted(IMPORTS, key=lambda i: (i.importer, i.line)):
        if imp.importer in members and imp.target in members and imp.importer != imp.target:
            first.setdefault((imp.importer, imp.target), imp)
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for (importer, target), imp in first.items():
                if importer != node or target in came_from:
                    continue
                came_from[target] = imp
                if target == start:
                    chain = [imp]
                    while chain[0].importer != start:
                        chain.insert(0, came_from[chain[0].importer])
                    return chain
                following.append(target)
        frontier = following
    return []


def test_no_import_cycles():
    problems = []
    for component in _cycles():
        members = set(component)
        seen: set[frozenset] = set()
        for start in component:
            chain = _shortest_cycle(start, members)
            key = frozenset((imp.importer, imp.target) for imp in chain)
            if not chain or key in seen:
                continue
            seen.add(key)
            problems.append(
                " -> ".join(f"{_rel(imp.importer)}:{imp.line}" for imp in chain) + f" -> {_rel(start)}"
            )
    assert not problems, "import cycles (each: the files and the lines of their imports):\n" + "\n".join(problems)


def _unresolved_relative_imports() -> list[str]:
    """``from .x import y`` lines whose module ``x`` is no file of the project (a module moved away)."""
    problems = []
    for module, path in MODULES.items():
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                package = module if _is_package(module) else module.rpartition(".")[0]
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
                if node.level - 1 >= len(parts) or source not in MODULES:
                    problems.append(f"{_rel(module)}:{node.lineno}: from {'.' * node.level}{node.module or ''} "
                                    f"names no module of the project")
    return problems


def test_relative_imports_resolve():
    problems = _unresolved_relative_imports()
    assert not problems, "relative imports of missing modules:\n" + "\n".join(problems)


def test_no_import_of_a_package_above():
    problems = [
        f"{_where(imp)}: takes {', '.join(imp.names) or imp.target} from {_rel(imp.target)}, a package above it"
        for imp in IMPORTS
        if imp.target in _ancestors(imp.importer)
    ]
    assert not problems, "imports from an ancestor package's __init__:\n" + "\n".join(problems)


def test_no_private_names_across_modules():
    problems = []
    for imp in IMPORTS:
        private = [n for n in imp.names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
        if private and imp.target != imp.importer:
            problems.append(f"{_where(imp)}: imports {', '.join(private)} from {_rel(imp.target)}")
    assert not problems, "private names imported from another module:\n" + "\n".join(problems)


def test_engine_files_are_short():
    problems = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_ENGINE_LINES:
            problems.append(f"{path.relative_to(ROOT).as_posix()}: {lines} lines")
    assert not problems, f"engine/ files over {MAX_ENGINE_LINES} lines:\n" + "\n".join(problems)


def test_kernels_stand_alone():
    problems = []
    for imp in IMPORTS:
        if not imp.importer.startswith("kernels"):
            continue
        if imp.target.split(".")[0] == "engine":
            problems.append(f"{_where(imp)}: kernels/ imports {imp.target}")
        in_aot = imp.importer == "kernels.aot" or imp.importer.startswith("kernels.aot.")
        if not in_aot and (imp.target == "kernels.aot" or imp.target.startswith("kernels.aot.")):
            problems.append(f"{_where(imp)}: a kernel module imports {imp.target}")
    assert not problems, "kernels/ must not import engine/ nor kernels.aot:\n" + "\n".join(problems)


def test_readme_is_a_front_door():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md: {lines} lines, more than {MAX_README_LINES}; move reference to docs/"


# --- links ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text(encoding="utf-8"))
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for match in _HEADING.finditer(text):
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_resolve():
    problems = []
    for doc in _documents():
        text = _CODE_SPAN.sub("", _FENCE.sub("", doc.read_text(encoding="utf-8")))
        for match in _LINK.finditer(text):
            target = match.group(1)
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
                continue
            path_part, _, anchor = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc
            where = doc.relative_to(ROOT).as_posix()
            if not dest.exists():
                problems.append(f"{where}: link to {target}: no file {path_part}")
                continue
            if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                problems.append(f"{where}: link to {target}: no heading #{anchor} in {dest.relative_to(ROOT).as_posix()}")
    assert not problems, "dangling links:\n" + "\n".join(problems)
