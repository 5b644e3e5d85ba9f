"""``%%flash`` / ``%flash`` in a real ipykernel, driven by jupyter_client as a notebook is.

The kernel runs this venv's Python against the test control plane (FLASH_JUPYTER_URL and
FLASH_JUPYTER_TOKEN); its cells run on real worker processes. Every check reads what a
front end would see: iopub messages (stream, display_data, execute_result, error), with the
time each came off the wire, and the control plane's own view over HTTP.
"""

from __future__ import annotations

import itertools
import re
import time

import pytest
from conftest import wait_for

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

import notebook_kernel as nk
from notebook_kernel import endpoint, health, jobs, start_kernel

# The shared kernel fixtures: pytest finds them as this module's attributes.
kernel, fresh_kernel, http = nk.kernel, nk.fresh_kernel, nk.http
_stop_endpoints = nk._stop_endpoints  # autouse

# ---------------------------------------------------------------------------- the example


def test_issue_example_streams_and_brings_names_back(kernel, name):
    kernel.ok(
        "import numpy as np\n"
        "data = np.arange(1_000_000)\n"
        "def normalise(v):\n"
        "    return (v - v.mean()) / v.std()\n"
    )
    r = kernel.run(
        f"%%flash name={name} workers=0,2 idle_timeout=30\n"
        "import time\n"
        "z = normalise(data)\n"
        "for i in range(3):\n"
        '    print("step", i); time.sleep(1)\n'
        "z[:5]\n",
        timeout=40,
    ).ok()
    steps = [m for m in r.streams if "step" in m.text]
    assert "".join(m.text for m in steps) == "step 0\nstep 1\nstep 2\n"
    assert len(steps) == 3, "each line streams as it is printed"
    gaps = [b.t - a.t for a, b in itertools.pairwise(steps)]
    assert all(0.5 < g < 2.0 for g in gaps), gaps
    result = [m for m in r.msgs if m.type == "execute_result"]
    assert len(result) == 1
    assert result[0].t - steps[0].t > 1.5, "step 0 arrived while the cell ran, not at the end"
    shown = r.value["text/plain"]
    assert shown.startswith("array([-1.7320")
    assert shown.count("-1.7320") == 5
    # Names the cell bound are in the notebook now, a module among them.
    assert kernel.value("z.shape") == "(1000000,)"
    assert kernel.value("type(z).__module__, abs(float(z.mean())) < 1e-9") == "('numpy', True)"
    assert kernel.value("time.__name__, time is __import__('time')") == "('time', True)"
    assert kernel.value("i") == "2"


def test_free_names_travel_by_value(kernel, name):
    kernel.ok(
        "import math\n"
        "SCALE = 3\n"
        "def triple(x):\n"
        "    return x * SCALE\n"
        "class Point:\n"
        "    def __init__(self, x, y):\n"
        "        self.x, self.y = x, y\n"
        "    def norm(self):\n"
        "        return math.hypot(self.x, self.y)\n"
        "inc = lambda v: v + 1\n"
    )
    r = kernel.run(
        f"%%flash name={name}\n"
        "import os\n"
        "p = Point(3, 4)\n"
        "out = (triple(2), p.norm(), inc(41), math.sqrt(16), os.getpid())\n"
        "out[:4]\n"
    ).ok()
    assert r.value["text/plain"] == "(6, 5.0, 42, 4.0)"
    # It really ran elsewhere: the pid is a worker's, not the kernel's.
    kernel_pid = kernel.value("import os; os.getpid()")
    assert kernel.value("out[4]") != kernel_pid
    # The instance made remotely from the notebook's class comes back and works here.
    assert kernel.value("p.norm(), type(p).__name__") == "(5.0, 'Point')"


# ---------------------------------------------------------------------------- errors before sending


def test_undefined_name_is_a_name_error_and_nothing_is_sent(kernel, name, http):
    kernel.ok(f"%%flash name={name}\nx = 1")
    before = health(http, name)["jobs"]
    n_jobs = len(jobs(http, name))
    r = kernel.run(f"%%flash name={name}\nx = 2\ny = nope + 1")
    assert r.error is not None
    assert r.error["ename"] == "NameError"
    assert r.error["evalue"] == "name 'nope' is not defined"
    assert "----> 2 y = nope + 1" in r.traceback, r.traceback  # points at the cell's line
    time.sleep(0.3)
    assert health(http, name)["jobs"] == before
    assert len(jobs(http, name)) == n_jobs
    assert kernel.run("y").error["ename"] == "NameError"


def test_unpicklable_variable_is_named_and_nothing_is_sent(kernel, name, http):
    kernel.ok(f"%%flash name={name}\nx = 1")
    before = health(http, name)["jobs"]
    n_jobs = len(jobs(http, name))
    kernel.ok("gen = (i * i for i in range(10))")
    r = kernel.run(f"%%flash name={name}\nx = 2\ntotal = sum(gen)")
    assert r.error is not None, r
    assert r.error["ename"] == "SerializationError"
    ev = r.error["evalue"]
    assert re.search(r"\bgen\b", ev) and "generator" in ev, ev  # the variable and its type
    assert "----> 2 total = sum(gen)" in r.traceback, r.traceback
    kernel.ok("import socket; sock = socket.socket()")
    try:
        r = kernel.run(f"%%flash name={name}\nfam = sock.family")
        assert r.error is not None and r.error["ename"] == "SerializationError", r
        ev = r.error["evalue"]
        assert re.search(r"\bsock\b", ev) and "socket" in ev, ev
    finally:
        kernel.ok("sock.close()")
    time.sleep(0.3)
    assert health(http, name)["jobs"] == before
    assert len(jobs(http, name)) == n_jobs
    # The generator was not consumed here either.
    assert kernel.value("next(gen)") == "0"


# ---------------------------------------------------------------------------- remote errors


def test_remote_exception_looks_local_and_is_catchable(kernel, name):
    r = kernel.run(f'%%flash name={name}\nx = 1\nraise ValueError("bad")')
    assert r.error is not None
    assert r.error["ename"] == "ValueError"
    assert r.error["evalue"] == "bad"
    tb = r.traceback
    assert 'raise ValueError("bad")' in tb, tb
    assert f"raised remotely: endpoint {name}" in tb, tb
    assert "flash_jupyter" not in tb, "the magic's own frames are hidden"
    # A remote ValueError is a ValueError: `except ValueError` catches it, through a
    # decorated function and through the magic itself.
    r = kernel.ok(
        "from flash_jupyter import Endpoint\n"
        f"@Endpoint(name={name + '-fn'!r})\n"
        "def check(v):\n"
        "    if v < 0:\n"
        '        raise ValueError("negative")\n'
        "    return v\n"
        "try:\n"
        "    check(-1)\n"
        "except ValueError as e:\n"
        '    print("caught", e)\n'
        "try:\n"
        f"    get_ipython().run_cell_magic('flash', 'name={name}', 'raise ValueError(\"bad\")')\n"
        "except ValueError as e:\n"
        '    print("caught", e)\n'
    )
    assert r.stdout == "caught negative\ncaught bad\n"


def test_remote_traceback_names_the_running_cell(kernel, name):
    """The remote frames carry the label of the cell that ran them ("Cell In[N]")."""
    r = kernel.run(f"%%flash name={name}\ndef f():\n    return 1 / 0\nf()")
    assert r.error is not None and r.error["ename"] == "ZeroDivisionError", r
    n = r.reply["execution_count"]
    tb = r.traceback
    assert "----> 3 f()" in tb and "----> 2     return 1 / 0" in tb, tb
    labels = re.findall(r"Cell In\[(\d+)\], line (\d+)", tb)
    assert labels, tb
    # Every frame is this cell's lines 3 and 2, as a local run shows them (no magic's frame).
    assert labels == [(str(n), "3"), (str(n), "2")], (n, labels, tb)
    # The same for an error found before sending.
    r = kernel.run(f"%%flash name={name}\nx = 1\nx + nope")
    assert r.error is not None and r.error["ename"] == "NameError", r
    n = r.reply["execution_count"]
    labels = re.findall(r"Cell In\[(\d+)\], line (\d+)", r.traceback)
    assert labels == [(str(n), "2")], (n, labels, r.traceback)


# ---------------------------------------------------------------------------- display


def test_display_from_the_worker_arrives_in_order(kernel, name):
    r = kernel.run(
        f"%%flash name={name}\n"
        "from IPython.display import HTML, display\n"
        'print("before")\n'
        'display(HTML("<b>hi</b>"))\n'
        'print("after")\n'
    ).ok()
    assert len(r.displays) == 1, r.msgs
    d = r.displays[0]
    assert "<b>hi</b>" in d.content["data"]["text/html"]
    assert r.stdout == "before\nafter\n"
    order = [m.type if m.type != "stream" else m.text.strip() for m in r.msgs]
    assert order == ["before", "display_data", "after"], order
    times = [m.t for m in r.msgs]
    assert times == sorted(times)
    # display() without an import works as in a notebook, too.
    r = kernel.run(f"%%flash name={name}\ndisplay({{'k': 1}})").ok()
    assert [m.content["data"]["text/plain"] for m in r.displays] == ["{'k': 1}"]


def test_matplotlib_figure_becomes_png(kernel, name):
    pytest.importorskip("matplotlib")
    r = kernel.run(
        f"%%flash name={name}\n"
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9])\n"
        "plt.show()\n",
        timeout=60,
    ).ok()
    pngs = [m.content["data"]["image/png"] for m in r.displays if "image/png" in m.content["data"]]
    assert len(pngs) == 1, r.msgs
    assert pngs[0].startswith("iVBORw0KGgo")  # base64 of the PNG signature


def test_last_expression_uses_the_notebook_formatters(kernel, name):
    kernel.ok(
        "class Card:\n"
        "    def __init__(self, t):\n"
        "        self.t = t\n"
        "    def _repr_html_(self):\n"
        "        return f'<div class=card>{self.t}</div>'\n"
    )
    r = kernel.run(f"%%flash name={name}\nCard('made remotely')").ok()
    assert r.value["text/html"] == "<div class=card>made remotely</div>"
    # A class the cell defines itself works as well.
    r = kernel.run(
        f"%%flash name={name}\n"
        "class Tag:\n"
        "    def _repr_html_(self):\n"
        "        return '<i>tag</i>'\n"
        "Tag()\n"
    ).ok()
    assert r.value["text/html"] == "<i>tag</i>"


def test_trailing_semicolon_hides_the_result(kernel, name):
    """As in any notebook cell, a last expression ending in ';' is not shown."""
    r = kernel.run(f"%%flash name={name}\nq = [1, 2]\nq;").ok()
    assert r.value is None, r.value
    assert kernel.value("q") == "[1, 2]"  # the names still come back


def test_last_expression_dataframe(kernel, name):
    pytest.importorskip("pandas")
    r = kernel.run(
        f"%%flash name={name}\nimport pandas as pd\npd.DataFrame({{'a': [1, 2]}})", timeout=60
    ).ok()
    assert "<table" in r.value["text/html"]


# ---------------------------------------------------------------------------- --noblock, --keep


def test_noblock_returns_a_handle_at_once(kernel, name):
    kernel.ok(f"%%flash name={name}\npass")  # a warm worker: the cold start is not timed
    r = kernel.run(
        f"%%flash name={name} --noblock -o h\n"
        "import time\n"
        "time.sleep(2)\n"
        'print("slept")\n'
        "answer = 41 + 1\n"
        "answer * 10\n"
    ).ok()
    assert r.idle - r.sent < 1.5, "the cell did not wait for the job"
    assert "running as h" in r.stdout
    assert kernel.run("answer").error["ename"] == "NameError"
    assert "flash cell" in kernel.value("h")
    started = r.msg_id
    r = kernel.ok("h.result()", timeout=30)
    assert r.value["text/plain"] == "420"
    # The job's output went into the cell that started it, not into the one that waited.
    assert "slept" not in r.stdout
    late = [m for m in kernel.msgs if m.parent == started and "slept" in m.text]
    assert late, "the --noblock cell's output did not stream into that cell"
    assert kernel.value("answer, h.done(), h.status()") == "(42, True, 'COMPLETED')"


def test_keep_leaves_the_value_on_the_worker(kernel, name, http):
    r = kernel.run(
        f"%%flash name={name} --keep m\nimport os\nm = {{'w': 3}}\nprint(os.getpid())"
    ).ok()
    pid1 = r.stdout.strip()
    [worker] = [w for w in endpoint(http, name)["workers"] if w["state"] == "Running"]
    text = kernel.value("repr(m)")
    assert "remote" in text and worker["id"] in text, text
    assert kernel.value("type(m).__name__") == "'RemoteValue'"
    r = kernel.run(f"%%flash name={name}\nprint(os.getpid())\nm['w'] * 2").ok()
    assert r.value["text/plain"] == "6"
    assert r.stdout.strip() == pid1, "the second cell ran on the worker holding m"
    assert kernel.value("m.fetch()") == "{'w': 3}"
    assert kernel.value("isinstance(m, dict)") == "False", "fetch does not replace m"


def test_lost_remote_state_is_named(kernel, name, http):
    kernel.ok(f"%%flash name={name} --keep m\nm = [1, 2, 3]")
    [worker] = [w["id"] for w in endpoint(http, name)["workers"] if w["state"] == "Running"]
    r = kernel.ok(f"%flash stop {name}")
    assert f"stopping {name}" in r.stdout
    wait_for(lambda: health(http, name)["workers"]["ready"] == 0, what="the worker to go")
    r = kernel.run(f"%%flash name={name}\nlen(m)", timeout=30)
    assert r.error is not None, r
    assert r.error["ename"] == "RemoteStateLost"
    assert "m" in re.findall(r"\w+", r.error["evalue"]), r.error["evalue"]
    assert worker in r.error["evalue"], r.error["evalue"]
    # A cell that does not need m works (on a new worker).
    assert kernel.value(f"%%flash name={name}\n6 * 7", timeout=30) == "42"


def test_the_notebook_is_told_when_its_remote_state_goes(kernel, name, http):
    """Not at the next use: the moment its worker stops, the proxy says it is lost, and
    %flash status says what went and why."""
    kernel.ok(f"%%flash name={name} --keep m\nm = [1, 2, 3]")
    [worker] = [w["id"] for w in endpoint(http, name)["workers"] if w["remote_state"]]
    kernel.ok(f"%flash stop {name}")
    wait_for(lambda: kernel.value("bool(m.lost)") == "True", what="the state_lost notice")
    text = kernel.value("repr(m)")
    assert "lost" in text and worker in text and ".fetch()" not in text, text
    out = kernel.ok("%flash status --text").stdout
    assert f"lost m on {name} (worker {worker})" in out, out


def test_a_lost_remote_value_keeps_saying_it_is_lost(kernel, name, http):
    """Once its worker is gone, the proxy left in the notebook says so at every use."""
    kernel.ok(f"%%flash name={name} --keep m\nm = [1, 2, 3]")
    kernel.ok(f"%flash stop {name}")
    wait_for(lambda: health(http, name)["workers"]["ready"] == 0, what="the worker to go")
    r = kernel.run(f"%%flash name={name}\nlen(m)", timeout=30)
    assert r.error is not None and r.error["ename"] == "RemoteStateLost", r
    r = kernel.run(f"%%flash name={name}\nlen(m)", timeout=30)
    assert r.error is not None and r.error["ename"] == "RemoteStateLost", (
        "second use of a lost name",
        r.error,
    )
    r = kernel.run("m.fetch()", timeout=30)
    assert r.error is not None and r.error["ename"] == "RemoteStateLost", ("m.fetch()", r.error)


def test_a_local_rebinding_replaces_the_remote_value(kernel, name):
    """The notebook's namespace decides what a name is: after ``m = ...`` here, a cell
    uses the new value, not the one left on the worker; after ``del m``, there is no m."""
    kernel.ok(f"%%flash name={name} --keep m\nm = {{'w': 3}}")
    kernel.ok("m = {'w': 10}")
    assert kernel.value(f"%%flash name={name}\nm['w']") == "10"
    kernel.ok(f"%%flash name={name} --keep m\nm = {{'w': 4}}")
    kernel.ok("del m")
    r = kernel.run(f"%%flash name={name}\nm['w']")
    assert r.error is not None and r.error["ename"] == "NameError", r


def test_a_remote_value_is_not_read_from_a_stale_copy_elsewhere(kernel, name):
    """A cell on endpoint B that uses a name held on endpoint A must not silently use an
    older copy of that name left in B's namespace by an earlier cell."""
    a, b = name, name + "-b"
    kernel.ok("m = {'w': 10}")
    assert kernel.value(f"%%flash name={b}\nm['w']") == "10"  # B's namespace now has m
    kernel.ok(f"%%flash name={a} --keep m\nm = {{'w': 3}}")  # the notebook's m: on A
    r = kernel.run(f"%%flash name={b}\nm['w']")
    if r.error is None:
        assert r.value["text/plain"] == "3", "B used a stale m (10), not the notebook's (3)"
    else:  # or a clear error: m lives on A
        assert "m" in re.findall(r"\w+", r.error["evalue"]) and a in r.error["evalue"], r.error


# ---------------------------------------------------------------------------- interrupt


def test_interrupt_cancels_the_job(kernel, name, http):
    kernel.ok(f"%%flash name={name}\npass")
    msg_id, sent = kernel.send(
        f"%%flash name={name}\n"
        "import time\n"
        "for i in range(300):\n"
        '    print("tick", i, flush=True)\n'
        "    time.sleep(0.1)\n"
    )
    wait_for(
        lambda: any(j["status"] == "IN_PROGRESS" for j in jobs(http, name)),
        what="the job to run",
    )
    time.sleep(0.8)
    t0 = time.monotonic()
    kernel.interrupt()
    r = kernel.wait(msg_id, sent, timeout=15)
    assert r.error is not None and r.error["ename"] == "KeyboardInterrupt", r
    err = next(m for m in r.msgs if m.type == "error")
    assert err.t - t0 < 3.0, err.t - t0
    assert "tick 0" in r.stdout, "output streamed until the interrupt"
    wait_for(lambda: jobs(http, name)[-1]["status"] == "CANCELLED", what="the job to be CANCELLED")
    # The endpoint works on, and nothing of the cancelled cell lands in later cells.
    assert kernel.ok('print("next")').stdout == "next\n"
    r = kernel.ok(f"%%flash name={name}\n'still works'", timeout=30)
    assert r.value["text/plain"] == "'still works'"
    assert "tick" not in r.stdout
    time.sleep(0.3)
    ticks = [m for m in kernel.msgs if m.type == "stream" and "tick" in m.text]
    assert ticks and all(m.parent == msg_id for m in ticks)


def test_output_never_lands_in_a_later_cell(kernel, name):
    kernel.ok(f"%%flash name={name}\npass")
    first, t1 = kernel.send(
        f"%%flash name={name}\n"
        "import time\n"
        'print("one", flush=True)\n'
        "time.sleep(1)\n"
        'print("two")\n'
        "import sys\n"
        'print("three", file=sys.stderr)\n'
    )
    second, t2 = kernel.send('print("second")')
    r1 = kernel.wait(first, t1, timeout=30).ok()
    r2 = kernel.wait(second, t2, timeout=30).ok()
    assert r1.stdout == "one\ntwo\n"
    assert r1.stderr == "three\n"
    assert r2.stdout == "second\n"
    flash_text = {"one", "two", "three"}
    for m in kernel.msgs:  # this test's messages (the kernel is shared), line by line
        if m.t >= t1 and m.type == "stream" and flash_text & set(m.text.splitlines()):
            assert m.parent == first, (m.parent, m.text)
    assert r1.idle <= r2.msgs[0].t


# ---------------------------------------------------------------------------- %flash


def test_line_magic_commands(fresh_kernel, name, http):
    k = fresh_kernel
    k.ok(f'%%flash name={name}\nprint("hello from the worker")')
    [worker] = [w["id"] for w in endpoint(http, name)["workers"]]
    out = k.ok("%flash status --text").stdout
    assert name in out and worker in out, out
    assert "state" in out and "hardware" in out
    r = k.ok("%flash")  # status is the default (the dashboard, with ipywidgets)
    out = r.stdout + "".join(m.content["data"].get("text/plain", "") for m in r.displays)
    assert name in out
    out = k.ok("%flash endpoints").stdout
    assert any(line.startswith(name) and "ready" in line for line in out.splitlines()), out
    out = k.ok(f"%flash logs {name}").stdout
    assert "hello from the worker" in out
    k.ok(f"%flash scale {name} 0,2")
    cfg = endpoint(http, name)["config"]
    assert (cfg["workers_min"], cfg["workers_max"]) == (0, 2)
    k.ok(f"%flash warm {name}")

    # Session defaults apply to the next plain %%flash cell.
    out = k.ok("%flash config gpu=A100 workers=0,2").stdout
    assert "A100" in out
    n2 = name + "-a100"
    assert k.value(f"%%flash name={n2}\n1 + 1") == "2"
    ep = endpoint(http, n2)
    assert ep["hardware"] == "A100"
    assert (ep["config"]["workers_min"], ep["config"]["workers_max"]) == (0, 2)
    assert all(w["hardware"].startswith("A100") for w in ep["workers"]), ep["workers"]

    r = k.run("%flash config bogus=1")
    assert r.error is not None and r.error["ename"] == "ConfigError", r
    assert "bogus" in r.error["evalue"]
    r = k.run("%flash frobnicate x")
    assert r.error is not None and r.error["ename"] == "ConfigError", r
    # A bad setting is not kept.
    assert "bogus" not in k.ok("%flash config").stdout


def test_line_magic_mistakes_say_what_to_do(kernel):
    """A mistyped command is named with the list of commands (not "needs an endpoint name");
    a bad MIN,MAX is a ConfigError naming the value, never a bare ValueError."""
    r = kernel.run("%flash sttus")
    assert r.error is not None and r.error["ename"] == "ConfigError", r
    assert "unknown %flash command 'sttus'" in r.error["evalue"], r.error
    assert "'status'" in r.error["evalue"] and "scale" in r.error["evalue"], r.error
    r = kernel.run("%flash scale x y")  # as typed in the issue: y is not MIN,MAX
    assert r.error is not None and r.error["ename"] == "ConfigError", r
    assert "'y'" in r.error["evalue"] and "MIN,MAX" in r.error["evalue"], r.error
    r = kernel.run("%flash logs")
    assert r.error is not None and "%flash logs NAME" in r.error["evalue"], r.error


def test_noblock_notice_comes_before_the_output(kernel, name):
    kernel.ok(f"%%flash name={name}\npass")
    r = kernel.ok(f"%%flash name={name} --noblock -o h2\nprint('first line of the job')")
    kernel.ok("h2.result()", timeout=30)
    text = "".join(m.text for m in kernel.msgs if m.parent == r.msg_id and m.type == "stream")
    assert text.startswith("running as h2 (job "), text
    assert ")\nfirst line of the job" in text, text


def test_a_cell_that_leaves_out_settings_keeps_them(kernel, name, http):
    """Settings are changes: naming an endpoint that exists uses it as it is."""
    kernel.ok(f"%%flash name={name} workers=0,2 idle_timeout=30\nx = 1")
    [before] = [(w["id"], w["incarnation"]) for w in endpoint(http, name)["workers"] if w["pid"]]
    kernel.ok(f"%%flash name={name}\nx = 2")
    ep = endpoint(http, name)
    cfg = ep["config"]
    assert (cfg["workers_min"], cfg["workers_max"], cfg["idle_timeout"]) == (0, 2, 30), cfg
    assert before in [(w["id"], w["incarnation"]) for w in ep["workers"]], ep["workers"]
    # A setting given is a change to it, and only to that setting.
    kernel.ok(f"%%flash name={name} idle_timeout=45\nx = 3")
    cfg = endpoint(http, name)["config"]
    assert (cfg["workers_max"], cfg["idle_timeout"]) == (2, 45), cfg


def test_default_endpoint_names_follow_the_hardware(kernel, http):
    """Cells without a name that ask for different hardware never share an endpoint."""
    kernel.ok("%%flash gpu=A100\nwhere = 1")
    kernel.ok("%%flash gpu=L4\nwhere = 2")
    names = [e["name"] for e in http.get("/v1/endpoints").json()]
    names = [n for n in names if n.startswith("notebook")]
    try:
        a100 = [n for n in names if endpoint(http, n)["config"]["gpu"] == ["A100"]]
        l4 = [n for n in names if endpoint(http, n)["config"]["gpu"] == ["L4"]]
        assert len(a100) == 1 and len(l4) == 1 and a100 != l4, names
        assert a100[0].startswith("notebook-") and a100[0] != "notebook", a100
        # The same settings give the same name again.
        kernel.ok("%%flash gpu=A100\nwhere = 3")
        again = [e["name"] for e in http.get("/v1/endpoints").json()]
        assert sorted(n for n in again if n.startswith("notebook")) == sorted(names), again
    finally:
        for n in names:
            http.delete(f"/v1/endpoints/{n}")


def test_a_kernel_that_ends_frees_its_state_on_the_worker(server, name, http, tmp_path):
    k = start_kernel(server, tmp_path)
    try:
        k.ok(f"%%flash name={name} --keep big\nbig = bytearray(1 << 20)")
        [w] = [w for w in endpoint(http, name)["workers"] if w["remote_state"]]
        [session] = w["remote_state"]
        assert w["remote_state"][session]["names"] == ["big"], w
    finally:
        k.shutdown()
    wait_for(lambda: not any(x["remote_state"] for x in endpoint(http, name)["workers"]),
             what="the ended kernel's state to be freed")  # fmt: skip
    # The worker freed it too: a new kernel of the same notebook finds nothing there.
    again = start_kernel(server, tmp_path)
    try:
        names = again.value(f"%%flash name={name}\nsorted(k for k in globals() if k[0] != '_')")
        assert "big" not in names, names
    finally:
        again.shutdown()


def test_cell_magic_documentation(kernel):
    """``%%flash?`` shows the cell magic's help: its flags and settings."""
    r = kernel.run("%%flash?").ok()
    doc = r.pager
    for word in ("--noblock", "--keep", "--out", "-o OUTPUT", "idle_timeout", "workers=MIN,MAX"):
        assert word in doc, (word, doc)
    assert "Run this cell on a remote worker" in doc
    doc = kernel.run("%flash?").ok().pager
    for word in ("status", "logs NAME", "stop NAME", "scale NAME MIN,MAX", "config"):
        assert word in doc, (word, doc)


def test_magic_usage_names_the_magics(kernel):
    """The usage lines (help and argument errors) name the magics as the user types them."""
    usage = kernel.run("%%flash?").ok().pager.split("Run this cell")[0]
    assert "%%flash [--noblock]" in usage, usage
    assert "flash_cell" not in usage, usage
    usage = kernel.run("%flash?").ok().pager.split("Inspect and steer")[0]
    assert "%flash [--endpoint ENDPOINT] [--text] [command]" in usage, usage
    assert "flash_line" not in usage, usage
    # IPython shows a UsageError as text on stderr, without a traceback.
    err = kernel.run("%%flash --no-such-flag\npass").stderr
    assert "UsageError" in err and "--no-such-flag" in err, err
    assert "flash_cell" not in err, err


def test_out_and_local_flags(kernel, name):
    r = kernel.ok(f"%%flash name={name} --out a --local\nimport os\na = 2 * 21\nb = os.getpid()")
    assert kernel.value("a") == "42"
    assert "remote" in kernel.value("repr(b)")  # not in --out: it stayed on the worker
    assert "local run: same a" in r.stdout  # the cell ran here too, and a agreed
    assert "b" in r.stdout.split("differs")[1]  # the pid, of course, did not


def test_display_ids_updates_and_clear_output(kernel, name):
    r = kernel.run(
        f"%%flash name={name}\n"
        "from IPython.display import HTML, clear_output, display, update_display\n"
        "h = display(HTML('<i>v1</i>'), display_id=True)\n"
        "h.update(HTML('<i>v2</i>'))\n"
        "update_display(HTML('<i>v3</i>'), display_id=h.display_id)\n"
        "clear_output(wait=True)\n"
        "print('cleared')\n"
    ).ok()
    kinds = [m.type for m in r.msgs]
    assert kinds.index("display_data") < kinds.index("update_display_data")
    shown = next(m for m in r.msgs if m.type == "display_data")
    updates = [m for m in r.msgs if m.type == "update_display_data"]
    ids = {shown.content["transient"]["display_id"]}
    ids |= {m.content["transient"]["display_id"] for m in updates}
    assert len(ids) == 1  # both updates target the output made first
    assert "<i>v3</i>" in updates[-1].content["data"]["text/html"]
    clear = next(m for m in r.msgs if m.type == "clear_output")
    assert clear.content["wait"] is True
    assert kinds.index("clear_output") < max(i for i, m in enumerate(r.msgs) if m.type == "stream")
