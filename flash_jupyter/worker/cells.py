"""Notebook cells on the worker: one namespace per notebook session, rich display.

A ``%%flash`` cell runs in its notebook's namespace on this worker (the "remote kernel"):
names it binds stay here for the next cell of the same notebook, and those that can travel
are also sent back. ``IPython.display.display`` and matplotlib figures are turned into
display messages for the caller's cell; no IPython kernel runs here.
"""

from __future__ import annotations

import ast
import builtins
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

from .. import errors, wire

RETURN_LIMIT = 64 << 20  # bytes: bigger values stay on the worker unless asked for


class Cells:
    def __init__(self, publish: Callable[..., None]):
        self.publish = publish  # (data, metadata) -> a display message for the running job
        self.namespaces: dict[str, dict[str, Any]] = {}
        self._hooks_installed = False

    # -- the run
    def run(self, session: str, code: str, inputs: dict[str, Any], opts: dict[str, Any]) -> Any:
        self._install_hooks()
        ns = self.namespaces.get(session)
        if ns is None:
            ns = self.namespaces[session] = {"__name__": "__main__", "__builtins__": builtins}
            ns["display"] = display
        for n in opts.get("drop", ()):
            ns.pop(n, None)
        ns.update(inputs)
        missing = [n for n in opts.get("needs_remote", ()) if n not in ns]
        if missing:
            raise errors.RemoteStateLost(
                f"{', '.join(missing)} not found on this worker (it was restarted)", missing
            )
        filename = opts.get("filename") or "<flash-cell>"
        tree = ast.parse(code, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, filename, "exec"), ns)
        value = None
        if last is not None:
            value = eval(compile(ast.Expression(last.value), filename, "eval"), ns)
        flush_figures()
        return self._collect(ns, value, last is not None, opts)

    def _collect(self, ns: dict[str, Any], value: Any, has_last: bool, opts: dict) -> dict:
        keep = set(opts.get("keep") or ())
        wanted = opts.get("out")
        limit = opts.get("limit") or RETURN_LIMIT
        values: dict[str, Any] = {}
        remote: dict[str, dict[str, Any]] = {}
        for name in opts.get("bound") or ():
            if name not in ns:
                continue
            v = ns[name]
            if name in keep or (wanted is not None and name not in wanted):
                remote[name] = describe(v, "kept on the worker")
                continue
            why = stays(v, limit)
            if why:
                remote[name] = describe(v, why)
            else:
                values[name] = v
        out: dict[str, Any] = {"values": values, "remote": remote}
        if has_last and value is not None:
            why = stays(value, limit)
            if why:
                out["last_remote"] = describe(value, why)
                out["last_mime"] = mimebundle(value)
            else:
                out["last"] = value
        return out

    def state(self, session: str) -> dict[str, int]:
        """What this session keeps here: name -> approximate bytes (for the dashboard)."""
        ns = self.namespaces.get(session, {})
        return {
            k: size_of(v)
            for k, v in ns.items()
            if not k.startswith("_") and k != "display" and not isinstance(v, type(sys))
        }

    def _install_hooks(self) -> None:
        if self._hooks_installed:
            return
        self._hooks_installed = True
        global _publish
        _publish = self.publish
        # Figures render to PNG here and travel as display data.
        import os

        os.environ.setdefault("MPLBACKEND", "Agg")
        sys.meta_path.insert(0, _PatchOnImport())
        for name in list(sys.modules):
            _patch(name)


# ---------------------------------------------------------------- what travels back


def size_of(v: Any) -> int:
    n = getattr(v, "nbytes", None)
    if isinstance(n, int):
        return n
    try:
        return sys.getsizeof(v)
    except TypeError:
        return 0


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


def stays(v: Any, limit: int) -> str | None:
    """Why a value stays on the worker (None: it travels)."""
    if _on_gpu(v):
        return "on the GPU"
    if size_of(v) > limit:
        return f"larger than {limit >> 20} MiB"
    if isinstance(v, type(sys)):
        return None  # modules travel by reference
    try:
        wire.dumps(v, what="value")
    except errors.SerializationError:
        return "not picklable"
    return None


def describe(v: Any, why: str) -> dict[str, Any]:
    d: dict[str, Any] = {"type": _type_name(v), "bytes": size_of(v), "why": why}
    for attr in ("shape", "dtype", "device"):
        a = getattr(v, attr, None)
        if a is not None and not callable(a):
            d[attr] = str(tuple(a)) if attr == "shape" else str(a)
    try:
        d["repr"] = repr(v)[:300]
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
