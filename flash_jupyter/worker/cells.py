"""Notebook cells on the worker: one namespace per notebook session, rich display.

A ``%%flash`` cell runs in its notebook's namespace on this worker (the "remote kernel").
What each name there is to the notebook decides how long it stays:

- *state*: names that stayed here and are remote names (proxies) in the notebook: kept
  (``--keep``, not in ``--out``), too big, not picklable, on the GPU, or sent back but not
  rebuildable in the notebook (its kernel cannot import their module). Only these are
  reported (``state``) and live as long as the worker.
- *pending*: names sent back that the notebook has not confirmed yet. Its next cell here
  says, per name, whether it arrived (then it is a copy) or stays (then it is state).
- *copies*: values the notebook also has (the cell's inputs, names that arrived there).
  They are dropped after the cell, unless code that stays here (a kept function or class,
  or an object of a class defined here) reads them as globals.

Each name sent back is pickled on its own, once, so that one value the notebook cannot
rebuild does not take the others with it; big buffers stay out-of-band.
``IPython.display.display`` and matplotlib figures are turned into display messages for
the caller's cell; no IPython kernel runs here.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib.abc
import importlib.util
import itertools
import os
import pickle
import reprlib
import sys
import types
from collections.abc import Callable
from typing import Any

from .. import errors, wire

RETURN_LIMIT = 64 << 20  # bytes: bigger values stay on the worker unless asked for


class Session:
    """One notebook's namespace here, and what each of its names is to the notebook."""

    def __init__(self) -> None:
        self.ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins,
                                   "display": display}  # fmt: skip
        # name -> (the cell that made it state, its packed size if it was packed)
        self.kept: dict[str, tuple[str, int | None]] = {}
        self.pending: dict[str, tuple[str, int]] = {}  # name -> (cell, packed size)
        self.copies: set[str] = set()

    def reset(self, name: str) -> None:
        """``name`` is bound anew: what it was to the notebook no longer holds."""
        self.kept.pop(name, None)
        self.pending.pop(name, None)
        self.copies.discard(name)

    def settle(self, notes: Any) -> None:
        """The notebook's word on names of earlier cells here: ``[name, cell, verdict]``,
        verdict "back" (it arrived), "stays" (it could not be rebuilt there: state from
        now on) or "gone" (the notebook no longer holds its proxy). A note about another
        cell (the name was bound again since) changes nothing."""
        for name, cell, verdict in notes or ():
            if verdict == "gone":
                k = self.kept.get(name)
                if k is not None and k[0] == cell:
                    del self.kept[name]
                    self.copies.add(name)
                continue
            p = self.pending.get(name)
            if p is None or p[0] != cell:
                continue
            del self.pending[name]
            if verdict == "stays":
                self.kept[name] = (cell, p[1])
            else:
                self.copies.add(name)

    def sweep(self) -> None:
        """Drop the copies that nothing staying here reads."""
        if not self.copies:
            return
        names = [*self.kept, *self.pending]  # copies: cells may run in threads
        roots = [self.ns[n] for n in names if n in self.ns]
        needed = globals_read(self.ns, roots)
        for n in list(self.copies):
            if n in self.kept or n in self.pending:
                self.copies.discard(n)
            elif n not in needed:
                self.ns.pop(n, None)
                self.copies.discard(n)


class Cells:
    def __init__(self, publish: Callable[..., None]):
        self.publish = publish  # (data, metadata) -> a display message for the running job
        self.sessions: dict[str, Session] = {}
        self._hooks_installed = False

    # -- the run
    def run(self, session: str, code: str, inputs: dict[str, Any], opts: dict[str, Any]) -> Any:
        self._install_hooks()
        s = self.sessions.get(session)
        if s is None:
            s = self.sessions[session] = Session()
        ns = s.ns
        for n in opts.get("drop", ()):  # no older copy here may stand in for these
            s.reset(n)
            ns.pop(n, None)
        s.settle(opts.get("ack"))
        s.sweep()
        for n in inputs:
            s.reset(n)
        ns.update(inputs)
        try:
            missing = [n for n in opts.get("needs_remote", ()) if n not in ns]
            if missing:
                raise errors.RemoteStateLost(
                    f"{', '.join(missing)} not found on this worker (it was restarted)", missing
                )
            has_value, value = exec_cell(code, opts.get("filename") or "<flash-cell>", ns)
            flush_figures()
            return self._collect(s, value, has_value, opts)
        finally:
            # Inputs the cell did not bind again are the notebook's values: copies.
            for n, v in inputs.items():
                if ns.get(n) is v and n not in s.kept and n not in s.pending:
                    s.copies.add(n)
            s.sweep()

    def _collect(self, s: Session, value: Any, has_last: bool, opts: dict) -> dict:
        """The cell's names for the notebook: ``values`` (name -> packed), ``about`` (name ->
        description, for a value the notebook cannot rebuild), ``remote`` (name ->
        description of a name that stayed), ``cell`` (this cell's id, for the notebook's
        notes), and ``last`` (packed) or ``last_remote``."""
        ns = s.ns
        keep = set(opts.get("keep") or ())
        wanted = opts.get("out")
        limit = opts.get("limit") or RETURN_LIMIT
        cell = os.urandom(6).hex()
        values: dict[str, tuple] = {}
        about: dict[str, dict[str, Any]] = {}
        remote: dict[str, dict[str, Any]] = {}
        for name in opts.get("bound") or ():
            if name not in ns:
                continue
            v = ns[name]
            s.reset(name)
            if name in keep or (wanted is not None and name not in wanted):
                remote[name] = describe(v, "kept on the worker")
                s.kept[name] = (cell, None)
                continue
            packed, why, nbytes = pack(v, limit)
            if packed is None:
                remote[name] = describe(v, why, nbytes)
                s.kept[name] = (cell, nbytes)
            else:
                values[name] = packed
                about[name] = describe(v, "", nbytes)
                s.pending[name] = (cell, nbytes)
        out: dict[str, Any] = {"cell": cell, "values": values, "about": about, "remote": remote}
        if has_last and value is not None:
            packed, why, nbytes = pack(value, limit)
            if packed is None:
                out["last_remote"] = describe(value, why, nbytes)
                out["last_mime"] = mimebundle(value)
            else:
                out["last"] = packed
                out["last_about"] = describe(value, "", nbytes)
        return out

    def forget(self, session: str) -> None:
        """The notebook's kernel ended: nothing can reach its names here any more."""
        self.sessions.pop(session, None)

    def state(self, session: str) -> dict[str, int]:
        """What this session keeps here, name -> bytes: the names that are remote names in
        the notebook (not copies, not names sent back)."""
        s = self.sessions.get(session)
        if s is None:
            return {}
        out = {}
        for n, (_, nbytes) in list(s.kept.items()):
            if n in s.ns:
                out[n] = nbytes if nbytes is not None else estimate_size(s.ns[n])[0]
        return out

    def _install_hooks(self) -> None:
        if self._hooks_installed:
            return
        self._hooks_installed = True
        global _publish
        _publish = self.publish
        # Figures render to PNG here and travel as display data.
        os.environ.setdefault("MPLBACKEND", "Agg")
        sys.meta_path.insert(0, _PatchOnImport())
        for name in list(sys.modules):
            _patch(name)


# ---------------------------------------------------------------- what code here reads


def globals_read(ns: dict[str, Any], roots: list[Any]) -> set[str]:
    """The names of ``ns`` that code defined in ``ns`` and reachable from ``roots``
    (functions, classes, methods, objects of those classes) may read as globals, and what
    those names' own code reads in turn."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        try:
            codes_of_v = _code_of(v, ns)
        except Exception:  # an object whose attributes fail when looked at
            continue
        for code in codes_of_v:
            codes = [code]
            while codes:
                c = codes.pop()
                codes.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
                for n in c.co_names:
                    if n in ns and n not in found:
                        found.add(n)
                        stack.append(ns[n])
    return found


def _code_of(v: Any, ns: dict[str, Any], depth: int = 0) -> list[types.CodeType]:
    """Code objects run with ``ns`` as their globals, held by ``v`` (shallowly)."""
    if isinstance(v, types.FunctionType):
        return [v.__code__] if v.__globals__ is ns else []
    if isinstance(v, (types.MethodType, staticmethod, classmethod)):
        return _code_of(v.__func__, ns, depth)
    if isinstance(v, functools.partial):
        return _code_of(v.func, ns, depth)
    if isinstance(v, property):
        return [c for f in (v.fget, v.fset, v.fdel) if f is not None for c in _code_of(f, ns)]
    if depth > 1:
        return []
    if isinstance(v, type):
        if v.__module__ != ns.get("__name__"):
            return []
        return [c for klass in v.__mro__ if klass.__module__ == ns.get("__name__")
                for a in vars(klass).values() for c in _code_of(a, ns, 2)]  # fmt: skip
    if isinstance(v, (list, tuple, set, frozenset)) and len(v) <= 256:
        return [c for item in v for c in _code_of(item, ns, depth + 1)]
    if isinstance(v, dict) and len(v) <= 256:
        return [c for item in v.values() for c in _code_of(item, ns, depth + 1)]
    if isinstance(v, types.ModuleType):
        return []
    out = _code_of(type(v), ns, depth + 1)
    try:
        attrs = vars(v)
    except TypeError:
        return out
    if isinstance(attrs, dict) and len(attrs) <= 256:
        out += [c for a in attrs.values() for c in _code_of(a, ns, depth + 1)]
    return out


# ---------------------------------------------------------------- what travels back


def pack(v: Any, limit: int) -> tuple[tuple | None, str, int | None]:
    """``(packed, why, bytes)``: packed is ``(data, buffers, codec)`` when ``v`` travels
    (each buffer a ``PickleBuffer``, so the result's own pickle keeps it out-of-band);
    otherwise None and why it stays. ``bytes``: its packed size when it was packed."""
    if _on_gpu(v):
        return None, "on the GPU", None
    if not isinstance(v, types.ModuleType) and estimate_size(v, budget=256)[0] > limit:
        return None, f"larger than {_human(limit)}", None  # a lower bound: no need to pickle
    try:
        p = wire.dumps(v, what="value")
    except errors.SerializationError:
        return None, "not picklable", None
    n = p.nbytes
    if n > limit:
        return None, f"larger than {_human(limit)}", n
    data: Any = pickle.PickleBuffer(p.data) if len(p.data) >= wire.OOB_THRESHOLD else p.data
    return (data, [pickle.PickleBuffer(b) for b in p.buffers], p.codec), "", n


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _array_bytes(o: Any) -> int | None:
    """The bytes an array-like holds (numpy, torch, cupy, jax, pandas), else None."""
    try:
        n = getattr(o, "nbytes", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
        if (type(o).__module__ or "").startswith("pandas"):  # a DataFrame has no nbytes
            mu = getattr(o, "memory_usage", None)
            if callable(mu):
                n = mu(index=True)
                return int(n.sum() if hasattr(n, "sum") else n)
        es, ne = getattr(o, "element_size", None), getattr(o, "nelement", None)
        if callable(es) and callable(ne):
            return int(es()) * int(ne())
    except Exception:  # a property that fails: not an array after all
        return None
    return None


_LEAVES = (int, float, complex, str, bytes, bytearray, range, slice, type(None), memoryview)
_NOT_COUNTED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
                types.MethodType, types.CodeType, functools.partial)  # fmt: skip


def estimate_size(v: Any, budget: int = 2000) -> tuple[int, str]:
    """``(bytes, how)``: the memory ``v`` holds, walking containers and attributes (at most
    ``budget`` objects; arrays count their ``nbytes``). ``how``: "exact"; "at least" (the
    walk stopped early, or met objects whose size it cannot see); "unknown" (it saw too
    little to say anything useful). Code, classes and modules are shared: not counted."""
    if isinstance(v, _NOT_COUNTED):
        return sys.getsizeof(v), "exact"  # itself, not what it shares
    total, partial, opaque = 0, False, False
    seen: set[int] = set()
    stack = [v]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        budget -= 1
        if budget < 0:
            partial = True
            break
        try:
            n, children, whole = _visit(o, budget)
        except Exception:  # an object whose attributes fail when looked at
            n, children, whole = 0, [], None
        total += n
        stack += children
        partial |= whole is False
        opaque |= whole is None
    if not partial and not opaque:
        return total, "exact"
    return total, "at least" if total >= 64 << 10 else "unknown"


def _visit(o: Any, budget: int) -> tuple[int, list[Any], bool | None]:
    """One object of the walk: (its own bytes, what it holds, whether that is all of it:
    True; False, more than the budget; None, unseen parts)."""
    if isinstance(o, _LEAVES):
        return sys.getsizeof(o), [], True
    if isinstance(o, _NOT_COUNTED):
        return 0, [], True
    n = _array_bytes(o)
    if n is not None:
        return n, [], True
    own = sys.getsizeof(o)
    if isinstance(o, dict):
        items = list(itertools.islice(o.items(), budget))
        return own, [x for kv in items for x in kv], len(items) == len(o)
    if isinstance(o, (list, tuple, set, frozenset)) or type(o).__name__ == "deque":
        items = list(itertools.islice(o, budget))
        return own, items, len(items) == len(o)
    children: list[Any] = []
    d = getattr(o, "__dict__", None)
    if isinstance(d, dict):
        children.append(d)
    for klass in type(o).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(o, name):
                children.append(getattr(o, name))
    if not children and type(o).__module__ != "builtins":
        return own, [], None  # an extension type: what it holds is out of sight
    return own, children, True


def size_of(v: Any) -> int:
    """Approximate bytes held by ``v`` (a lower bound)."""
    return estimate_size(v)[0]


def _on_gpu(v: Any) -> bool:
    mod = type(v).__module__ or ""
    if not mod.startswith("torch"):
        return False
    if getattr(v, "is_cuda", False):
        return True
    params = getattr(v, "parameters", None)
    if callable(params):
        try:
            return any(p.is_cuda for p in params())
        except Exception:  # a duck that only looks like a module
            return False
    return False


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 300
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 10


def describe(v: Any, why: str, nbytes: int | None = None) -> dict[str, Any]:
    """What the notebook shows for a value it does not hold: type, size (``nbytes``: its
    packed size, when it was packed; else estimated here), shape, dtype, a short repr."""
    d: dict[str, Any] = {"type": _type_name(v), "why": why}
    if isinstance(v, types.ModuleType):
        d["module"] = v.__name__
    if nbytes is not None:
        d["bytes"], d["size"] = nbytes, "exact"
    else:
        d["bytes"], d["size"] = estimate_size(v)
    for attr in ("shape", "dtype", "device"):
        try:
            a = getattr(v, attr, None)
            if a is not None and not callable(a):
                d[attr] = str(tuple(a)) if attr == "shape" else str(a)
        except Exception:  # an attribute of that name that is something else
            continue
    try:
        if isinstance(v, (bytes, bytearray)) and len(v) > 300:  # repr() of it all is costly
            d["repr"] = f"{v[:280]!r}..."
        else:
            d["repr"] = _REPR.repr(v)[:300]
    except Exception:
        d["repr"] = f"<{d['type']}>"
    return d


def _type_name(v: Any) -> str:
    t = type(v)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


# ---------------------------------------------------------------- display


_publish: Callable[..., None] | None = None  # (data, metadata, **transient/update/clear)


_REPR_METHODS = (
    ("text/html", "_repr_html_"),
    ("image/png", "_repr_png_"),
    ("image/svg+xml", "_repr_svg_"),
    ("text/markdown", "_repr_markdown_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
)


def mimebundle(obj: Any) -> dict[str, Any]:
    """The representations a notebook would show for ``obj`` (text/plain always)."""
    data: dict[str, Any] = {}
    method = getattr(obj, "_repr_mimebundle_", None)
    if callable(method):
        try:
            r = method()
            data.update(r[0] if isinstance(r, tuple) else r or {})
        except Exception:
            pass
    for mime, attr in _REPR_METHODS:
        m = getattr(obj, attr, None)
        if callable(m) and mime not in data:
            try:
                r = m()
            except Exception:
                continue
            if r is not None:
                if isinstance(r, bytes):
                    import base64

                    r = base64.b64encode(r).decode()
                data[mime] = r
    try:
        data.setdefault("text/plain", repr(obj))
    except Exception:
        data.setdefault("text/plain", f"<{_type_name(obj)}>")
    return data


class DisplayHandle:
    """What ``display(..., display_id=...)`` returns: update that output in place later."""

    def __init__(self, display_id: str):
        self.display_id = display_id

    def __repr__(self) -> str:
        return f"<DisplayHandle display_id={self.display_id}>"

    def display(self, obj: Any, **kwargs: Any) -> None:
        display(obj, display_id=self.display_id, **kwargs)

    def update(self, obj: Any, **kwargs: Any) -> None:
        display(obj, display_id=self.display_id, update=True, **kwargs)


def display(
    *objs: Any,
    metadata: dict[str, Any] | None = None,
    transient: dict[str, Any] | None = None,
    display_id: str | bool | None = None,
    raw: bool = False,
    clear: bool = False,
    update: bool = False,
    **kwargs: Any,
) -> DisplayHandle | None:
    """IPython's ``display`` for a worker: each object becomes a display message in the
    caller's cell; ``display_id`` outputs can be updated in place, as in a kernel."""
    if clear:
        clear_output(wait=True)
    if display_id is True:
        import uuid

        display_id = uuid.uuid4().hex
    transient = dict(transient or {})
    if display_id:
        transient["display_id"] = display_id
    for obj in objs:
        data = obj if raw and isinstance(obj, dict) else mimebundle(obj)
        if _publish is not None:
            _publish(data, metadata or {}, transient=transient, update=update)
        else:
            print(data.get("text/plain", ""))
    return DisplayHandle(display_id) if display_id else None


def update_display(obj: Any, *, display_id: str, **kwargs: Any) -> None:
    display(obj, display_id=display_id, update=True, **kwargs)


def clear_output(wait: bool = False) -> None:
    if _publish is not None:
        _publish({}, {}, clear=wait)


def flush_figures() -> None:
    """Send every open matplotlib figure as a PNG, then close it (the inline backend's way)."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None or _publish is None:
        return
    import base64
    import io

    for num in plt.get_fignums():
        fig = plt.figure(num)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        _publish({"image/png": base64.b64encode(buf.getvalue()).decode(),
                  "text/plain": repr(fig)}, {})  # fmt: skip
    plt.close("all")


def _patch(name: str) -> None:
    mod = sys.modules.get(name)
    if mod is None:
        return
    if name in ("IPython.core.display_functions", "IPython.display", "IPython.core.display"):
        for attr, ours in (("display", display), ("update_display", update_display),
                           ("clear_output", clear_output)):  # fmt: skip
            if getattr(mod, attr, None) is not None:
                setattr(mod, attr, ours)
    elif name == "matplotlib.pyplot":
        mod.show = lambda *a, **k: flush_figures()


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patch IPython's display and pyplot.show as soon as user code imports them."""

    NAMES = ("IPython.core.display_functions", "IPython.display", "IPython.core.display",
             "matplotlib.pyplot")  # fmt: skip

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.NAMES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        real_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            real_exec(module)
            sys.modules[fullname] = module
            _patch(fullname)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def exec_cell(code: str, filename: str, ns: dict[str, Any]) -> tuple[bool, Any]:
    """Run a cell's code in ``ns`` as a notebook does: ``(True, value)`` when it ends with an
    expression (that expression's value), else ``(False, None)``. Shared by ``%%flash`` cells
    and deployed cell handlers (``app/handlers.py``)."""
    tree = ast.parse(code, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, filename, "exec"), ns)
    if last is None:
        return False, None
    return True, eval(compile(ast.Expression(last.value), filename, "eval"), ns)
