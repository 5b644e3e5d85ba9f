"""What a cell reads and what it binds, found statically (no code runs here).

``free`` names are those the cell loads (anywhere, functions and lambdas included, since
they run on the worker too); the ones that exist in the notebook travel with the cell.
``bound`` names are those the cell binds at top level (assignments, imports, defs, classes,
for/with/except targets): they come back. Names a cell loads that are neither bound by it,
nor in the notebook, nor builtins are a NameError before anything is sent, as Python would.
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass, field


@dataclass
class CellNames:
    loaded: set[str] = field(default_factory=set)
    bound_anywhere: set[str] = field(default_factory=set)  # incl. params, comprehensions
    bound: list[str] = field(default_factory=list)  # top level, in order of first binding
    first_use: dict[str, int] = field(default_factory=dict)  # loaded name -> first line
    # Names the cell binds in a top-level statement before any statement reads them
    # (`h = display(...)` then `h.update(...)`): the notebook's value is not needed.
    bound_first: set[str] = field(default_factory=set)


def analyse(code: str) -> CellNames:
    tree = ast.parse(code)
    names = CellNames()
    for node in ast.walk(tree):
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            # `x += 1` reads x first, though its target says Store.
            names.loaded.add(node.target.id)
            names.first_use.setdefault(node.target.id, node.lineno)
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                names.loaded.add(node.id)
                line = names.first_use.get(node.id)
                if line is None or node.lineno < line:
                    names.first_use[node.id] = node.lineno
            else:
                names.bound_anywhere.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.bound_anywhere.add(node.name)
        elif isinstance(node, ast.arg):
            names.bound_anywhere.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names.bound_anywhere.add(_import_name(a))
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.bound_anywhere.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.bound_anywhere.update(node.names)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.bound_anywhere.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.bound_anywhere.add(node.rest)
    seen: set[str] = set()
    read: set[str] = set()
    for stmt in tree.body:
        reads = {
            n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
        }
        if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name):
            reads.add(stmt.target.id)
        certain = isinstance(stmt, _ALWAYS_BINDS)  # not `if`/`for`/`try`: those may not run
        for n in _top_level_bindings(stmt):
            if n not in seen:
                seen.add(n)
                names.bound.append(n)
                if certain and n not in read and n not in reads:
                    names.bound_first.add(n)
        read |= reads
    return names


_ALWAYS_BINDS = (ast.Assign, ast.AnnAssign, ast.Import, ast.ImportFrom, ast.FunctionDef,
                 ast.AsyncFunctionDef, ast.ClassDef, ast.With, ast.AsyncWith)  # fmt: skip


def _import_name(alias: ast.alias) -> str:
    return alias.asname or alias.name.split(".")[0]


def _targets(t: ast.AST) -> list[str]:
    if isinstance(t, ast.Name):
        return [t.id]
    if isinstance(t, (ast.Tuple, ast.List)):
        return [n for e in t.elts for n in _targets(e)]
    if isinstance(t, ast.Starred):
        return _targets(t.value)
    return []  # attributes and subscripts bind nothing new


def _top_level_bindings(stmt: ast.stmt) -> list[str]:
    """Names a top-level statement binds in the module namespace (not inside functions)."""
    out: list[str] = []
    if isinstance(stmt, ast.Assign):
        for t in stmt.targets:
            out += _targets(t)
    elif isinstance(stmt, (ast.AugAssign, ast.AnnAssign)) and stmt.target is not None:
        out += _targets(stmt.target)
    elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        out.append(stmt.name)
    elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
        out += [_import_name(a) for a in stmt.names if a.name != "*"]
    elif isinstance(stmt, (ast.For, ast.AsyncFor)):
        out += _targets(stmt.target)
    elif isinstance(stmt, (ast.With, ast.AsyncWith)):
        for item in stmt.items:
            if item.optional_vars is not None:
                out += _targets(item.optional_vars)
    elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
        for h in stmt.handlers:  # type: ignore[attr-defined]
            if h.name:
                out.append(h.name)
    # Walrus targets at top level, and bindings in nested blocks (if/for/while/try/with).
    for node in ast.iter_child_nodes(stmt):
        if isinstance(node, ast.stmt):
            out += _top_level_bindings(node)
        elif isinstance(node, ast.expr):
            out += [n.target.id for n in ast.walk(node) if isinstance(n, ast.NamedExpr)]
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
        return [stmt.name]  # its body binds locals, not notebook names
    return out


BUILTINS = frozenset(dir(builtins)) | {"__name__", "__builtins__", "display", "get_ipython"}


def undefined(names: CellNames, available: set[str] | dict) -> list[str]:
    """Names the cell loads that nothing defines: Python would raise NameError."""
    return sorted(
        n
        for n in names.loaded
        if n not in names.bound_anywhere and n not in available and n not in BUILTINS
    )
