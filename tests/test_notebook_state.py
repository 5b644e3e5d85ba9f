"""What a notebook's cells leave on a worker, and what comes back of them.

- Each name a cell binds comes back on its own: one the kernel cannot rebuild (its module is
  only on the worker) stays there as a remote name, saying why, and the others still arrive.
- Only names that stayed are remote state: inputs and names that came back are copies, and
  the worker drops them (unless code that stays there reads them).
- Sizes say something true about what a remote name holds; a lost proxy says it is lost.

The first tests drive ``worker/cells.py`` and the notebook's bookkeeping directly; the
others run a real kernel against real workers (as ``test_magics.py`` does).
"""

from __future__ import annotations

import ast
import pickle
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from flash_jupyter import wire
from flash_jupyter.jupyter import cellcode
from flash_jupyter.jupyter.remote import RemoteValue
from flash_jupyter.jupyter.remote_names import Home, RemoteNames
from flash_jupyter.worker import cells

# ---------------------------------------------------------------- the worker's side


@pytest.fixture
def worker_cells(monkeypatch: pytest.MonkeyPatch) -> cells.Cells:
    """``Cells`` as a worker has it, without its display hooks (they would patch this
    process's IPython)."""
    monkeypatch.setattr(cells.Cells, "_install_hooks", lambda self: None)
    return cells.Cells(lambda *a, **k: None)


def run_cell(c: cells.Cells, code: str, inputs: dict | None = None, **opts) -> dict:
    """Run a cell as the worker does and return its result as the notebook receives it:
    through the wire's pickle, out-of-band buffers apart."""
    opts = {"bound": cellcode.analyse(code).bound, **opts}
    result = c.run("nb", code, dict(inputs or {}), opts)
    p = wire.dumps(result, what="the return value")
    return wire.loads(p.data, [bytes(b) for b in p.buffers], p.codec)


def user_names(c: cells.Cells) -> list[str]:
    return sorted(k for k in c.sessions["nb"].ns if not k.startswith("_") and k != "display")


def test_each_name_is_packed_once_and_big_buffers_stay_out_of_band(worker_cells):
    big = np.arange(1_000_000, dtype=np.float64)  # 8 MB
    result = worker_cells.run("nb", "a = big * 2\nn = 3", {"big": big},
                              {"bound": ["a", "n"]})  # fmt: skip
    data, buffers, _codec = result["values"]["a"]
    assert all(isinstance(b, pickle.PickleBuffer) for b in buffers)
    assert sum(b.raw().nbytes for b in buffers) == 8_000_000
    assert result["about"]["a"]["bytes"] == len(data) + 8_000_000  # its packed size
    assert result["about"]["a"]["type"] == "numpy.ndarray"
    # The result's own pickle holds no array bytes: they travel beside it, uncopied.
    p = wire.dumps(result, what="the return value")
    assert len(p.data) < 4096 and sum(b.nbytes for b in p.buffers) == 8_000_000
    back = wire.loads(p.data, [bytearray(b) for b in p.buffers], p.codec)
    a = wire.loads(*back["values"]["a"])
    assert a[-1] == 1_999_998.0 and wire.loads(*back["values"]["n"]) == 3


def test_inputs_and_names_that_came_back_are_not_state(worker_cells):
    c = worker_cells
    arr = np.ones(100_000)
    r1 = run_cell(c, "s1 = float(arr.sum())", {"arr": arr})
    assert user_names(c) == ["s1"]  # arr was a copy: dropped after the cell
    assert c.state("nb") == {}  # s1 went back: not state, though kept until the notebook says
    r2 = run_cell(c, "s2 = float(arr.sum())", {"arr": arr}, ack=[["s1", r1["cell"], "back"]])
    assert user_names(c) == ["s2"]
    assert c.state("nb") == {}
    # A name the notebook could not rebuild stays, and is state from then on.
    run_cell(c, "s3 = 1", ack=[["s2", r2["cell"], "stays"]])
    assert c.state("nb") == {"s2": r2["about"]["s2"]["bytes"]}
    assert user_names(c) == ["s2", "s3"]
    # A note about an older binding of a name changes nothing.
    run_cell(c, "s2 = 5", ack=[])
    run_cell(c, "pass", ack=[["s2", r2["cell"], "back"]])
    assert "s2" in user_names(c)


def test_kept_names_are_state_until_the_notebook_lets_them_go(worker_cells):
    c = worker_cells
    arr = np.ones(100_000)
    r = run_cell(c, "big = arr * 2\nsmall = 1", {"arr": arr}, keep=["big"])
    assert c.state("nb") == {"big": 800_000}
    assert r["remote"]["big"]["why"] == "kept on the worker"
    assert user_names(c) == ["big", "small"]
    run_cell(c, "pass", ack=[["small", r["cell"], "back"], ["big", r["cell"], "gone"]])
    assert c.state("nb") == {} and user_names(c) == []


def test_code_that_stays_keeps_the_globals_it_reads(worker_cells):
    """A kept function reads the notebook's SCALE and a helper the cell sent back: both
    stay (not as state), so calling it later works; the rest goes."""
    c = worker_cells
    r = run_cell(
        c,
        "import math\ndef helper(x):\n    return math.floor(x) * SCALE\n"
        "def f(x):\n    return helper(x) + 1\nunused = 2",
        {"SCALE": 3, "other": 4},
        keep=["f"],
    )
    acks = [[n, r["cell"], "back"] for n in ("math", "helper", "unused")]
    r2 = run_cell(c, "y = f(2.5)", ack=acks)
    assert wire.loads(*r2["values"]["y"]) == 7
    assert user_names(c) == ["SCALE", "f", "helper", "math", "y"]
    assert set(c.state("nb")) == {"f"}


def test_sizes_are_deep_and_never_a_misleading_tiny_number():
    class Model:  # a fitted estimator: arrays in its attributes
        def __init__(self):
            self.coef_ = np.ones(100_000)
            self.classes_ = [np.zeros(10), np.zeros(10)]
            self.params = {"alpha": 0.1}

    model = Model()
    n, how = cells.estimate_size(model)
    assert how == "exact" and 800_160 <= n < 802_000, n
    assert cells.describe(model, "kept")["bytes"] == n
    # Something whose memory is out of sight is "unknown", not 56 B.
    n, how = cells.estimate_size(threading.Lock())
    assert how == "unknown"
    v = RemoteValue("lock", "ep", "w-1", 1, "cpu", cells.describe(threading.Lock(), "why"))
    assert "size unknown" in repr(v), repr(v)
    # A walk that must stop gives a lower bound, said as one.
    n, how = cells.estimate_size([[i] for i in range(10_000)])
    assert how == "at least" and n > 80_000
    v = RemoteValue("x", "ep", "w-1", 1, "cpu", {"type": "list", "bytes": n, "size": how})
    assert "list at least " in repr(v), repr(v)


# ---------------------------------------------------------------- the notebook's side


def test_a_lost_proxy_says_so_and_offers_no_fetch():
    p = RemoteValue("m", "ep", "ep-1", 1, "cpu", {"type": "list", "bytes": 88}, lambda v: 1)
    assert ".fetch() brings it here" in repr(p)
    p.lost = "m lived on worker ep-1, which is gone"
    text = repr(p)
    assert "lost: m lived on worker ep-1, which is gone" in text, text
    assert "fetch" not in text, text
    assert p._repr_mimebundle_() == {"text/plain": text}


def test_notes_reach_the_worker_they_are_for():
    names = RemoteNames()
    ns: dict = {}
    names.settle("ep", Home("ep-1", 1, "cpu"))
    names.take("ep", {"a": 1}, {"m": {"type": "dict"}}, ns, None, cell="c1")
    names.note("ep", ("ep-1", 1), "a", "c1", "back")
    assert names.notes_for("ep") == [["a", "c1", "back"]]
    del ns["m"]  # the notebook lets the proxy go: the worker may free it
    names.prune("ep", ns)
    sent = names.notes_for("ep")
    assert sent == [["a", "c1", "back"], ["m", "c1", "gone"]]
    names.delivered("ep", ("ep-2", 1), sent)  # ran elsewhere: still owed to ep-1
    assert names.notes_for("ep") == sent
    names.delivered("ep", ("ep-1", 1), sent)
    assert names.notes_for("ep") == []
    names.note("ep", ("ep-1", 1), "b", "c2", "back")
    names.forget("ep", "ep-1")  # that worker is gone: nothing is owed to it
    assert names.notes_for("ep") == []


# ---------------------------------------------------------------- in a real kernel

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

import notebook_kernel as nk  # noqa: E402
from kernel import Kernel  # noqa: E402 - after the skips: it needs jupyter_client
from notebook_kernel import endpoint  # noqa: E402

# The shared kernel fixtures: pytest finds them as this module's attributes.
kernel, http, _stop_endpoints = nk.kernel, nk.http, nk._stop_endpoints


def session_of(kernel: Kernel) -> str:
    magics = "get_ipython().magics_manager.registry['FlashMagics']"
    return ast.literal_eval(kernel.value(f"{magics}.session"))


def remote_state(http, name: str, session: str) -> tuple[list[str], int]:
    """What the endpoint's workers report keeping for this notebook: (names, bytes)."""
    names, nbytes = [], 0
    for w in endpoint(http, name)["workers"]:
        st = (w.get("remote_state") or {}).get(session)
        if st:
            names += st["names"]
            nbytes += st["bytes"]
    return sorted(names), nbytes


WORKER_ONLY = """\
VALUE = 21


class Thing:
    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f"Thing({self.n})"
"""


def test_a_module_only_the_worker_has_stays_there(kernel, name, http, tmp_path: Path):
    folder = tmp_path / "worker-only"
    folder.mkdir()
    (folder / "fjworkeronly.py").write_text(WORKER_ONLY)
    assert kernel.run("import fjworkeronly").error["ename"] == "ModuleNotFoundError"
    head = f"%%flash name={name} workers=0,1 env=PYTHONPATH={folder}\n"
    r = kernel.run(
        head + "import fjworkeronly\nthing = fjworkeronly.Thing(7)\nn = 42\nprint('made', thing)",
        timeout=60,
    ).ok()
    assert r.stdout == "made Thing(7)\n"
    assert kernel.value("n") == "42"  # the plain value came back
    kinds = kernel.value("type(fjworkeronly).__name__, type(thing).__name__")
    assert kinds == "('RemoteValue', 'RemoteValue')"
    text = kernel.value("repr(thing)")
    assert "fjworkeronly.Thing" in text, text
    assert "its type needs module 'fjworkeronly', which this kernel cannot import" in text, text
    assert ".fetch()" not in text, text
    text = kernel.value("repr(fjworkeronly)")
    assert "module fjworkeronly" in text and "cannot import module 'fjworkeronly'" in text, text
    # Later cells use them where they are; what they make comes back.
    r = kernel.run(head + "m = fjworkeronly.VALUE * 2\nm + thing.n").ok()
    assert r.value["text/plain"] == "49"
    assert kernel.value("m") == "42"
    # A last value of such a type is shown as a proxy, with the worker's rendering of it.
    shown = kernel.value(head + "fjworkeronly.Thing(3)")
    assert "Thing(3)" in shown and "cannot import" in shown, shown
    # The worker keeps what stayed, as this notebook's state; not what came back.
    assert remote_state(http, name, session_of(kernel))[0] == ["fjworkeronly", "thing"]
    r = kernel.ok(head + "print(sorted(k for k in globals() if not k.startswith('_')))")
    assert r.stdout == "['display', 'fjworkeronly', 'thing']\n", r.stdout


def test_copies_do_not_pile_up_on_the_worker(kernel, name, http):
    """Three cells read one notebook array: the worker keeps none of the copies, nor the
    names that came back; only what a cell kept is state (and status says so)."""
    kernel.ok("import numpy as np\narr = np.ones(1_000_000)\nSCALE = 3")
    head = f"%%flash name={name} workers=0,1"
    for i in (1, 2, 3):
        kernel.ok(f"{head}\ns{i} = float(arr.sum()) + {i}")
    assert kernel.value("s1, s2, s3") == "(1000001.0, 1000002.0, 1000003.0)"
    session = session_of(kernel)
    assert remote_state(http, name, session) == ([], 0)
    kernel.ok(f"{head} --keep big,f\nbig = arr * 2\ndef f(x):\n    return x * SCALE")
    names, nbytes = remote_state(http, name, session)
    assert names == ["big", "f"] and 8_000_000 <= nbytes < 8_010_000, (names, nbytes)
    r = kernel.ok(f"{head}\nprint(sorted(k for k in globals() if not k.startswith('_')))")
    # SCALE stays because the kept f reads it (f(2) below works); it is not state.
    assert r.stdout == "['SCALE', 'big', 'display', 'f']\n", r.stdout
    assert kernel.value(f"{head}\nf(2)") == "6"
    out = kernel.ok("%flash status --text").stdout
    keeps = [line for line in out.splitlines() if " keeps " in line and name in line]
    assert len(keeps) == 1 and f"keeps {session}'s big, f (8.0 MB)" in keeps[0], out
    mine = [line for line in out.splitlines() if line.startswith("remote state of this notebook")]
    assert any(line.endswith(f"({name}): big, f") for line in mine), out


def test_a_kept_model_shows_a_meaningful_size(kernel, name, http):
    kernel.ok(
        "import numpy as np\n"
        "class Model:\n"
        "    def fit(self, n):\n"
        "        self.coef_ = np.ones(n)\n"
        "        return self\n"
    )
    kernel.ok(f"%%flash name={name} --keep model\nmodel = Model().fit(100_000)")
    text = kernel.value("repr(model)")
    assert re.search(r"Model 781\.\d KB on ", text), text
    # A connection: not picklable, and its memory is out of sight.
    kernel.ok(f"%%flash name={name}\nimport sqlite3\ndb = sqlite3.connect(':memory:')")
    text = kernel.value("repr(db)")
    assert "sqlite3.Connection size unknown on" in text and "not picklable" in text, text
