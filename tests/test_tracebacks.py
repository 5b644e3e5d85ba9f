"""What a notebook shows when something fails: the user's frames and the message, nothing of
flash-jupyter's (issue #7). Every check reads the error message a real kernel sends, as a
front end would render it (ANSI colours stripped)."""

from __future__ import annotations

import re

import pytest
from conftest import wait_for

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

import notebook_kernel as nk
from kernel import Kernel, Result  # after the skips: it needs jupyter_client
from notebook_kernel import jobs

# The shared kernel fixtures: pytest finds them as this module's attributes.
kernel, http, _stop_endpoints = nk.kernel, nk.http, nk._stop_endpoints


def nothing_of_ours(r: Result) -> str:
    """The error's traceback, checked for flash-jupyter's and IPython's own traces."""
    assert r.error is not None, r
    tb = r.traceback
    for trace in ("/flash_jupyter/", "run_cell_magic", "skipping hidden", "RemoteTraceback",
                  "Remote traceback", "site-packages/IPython"):  # fmt: skip
        assert trace not in tb, (trace, tb)
    return tb


def same_cell(tb: str) -> str:
    """A traceback with the cell numbers made alike (one cell ran twice)."""
    return re.sub(r"Cell In\[\d+\]", "Cell In[#]", tb)


# ---------------------------------------------------------------------------- our own errors


def test_a_bad_setting_in_a_magic_shows_only_the_message(kernel):
    r = kernel.run("%%flash gpu=NOPE\nx = 1")
    tb = nothing_of_ours(r)
    assert r.error["ename"] == "ConfigError", r.error
    assert tb.strip() == f"ConfigError: {r.error['evalue']}", tb
    r = kernel.run("%flash config gpu=NOPE")
    assert nothing_of_ours(r).strip() == f"ConfigError: {r.error['evalue']}"


def test_a_bad_setting_in_the_decorator_shows_the_users_line(kernel):
    r = kernel.run('from flash_jupyter import Endpoint\nf = Endpoint(gpu="NOPE")')
    tb = nothing_of_ours(r)
    assert r.error["ename"] == "ConfigError", r.error
    assert '----> 2 f = Endpoint(gpu="NOPE")' in tb, tb
    assert len(re.findall(r"Cell In\[\d+\], line \d+", tb)) == 1, tb  # that line, no other
    assert tb.rstrip().endswith(f"ConfigError: {r.error['evalue']}"), tb


def test_an_error_found_before_sending_points_at_the_cell_line_only(kernel, name):
    r = kernel.run(f"%%flash name={name}\nx = 2\ny = nope + 1")
    tb = nothing_of_ours(r)
    assert r.error["ename"] == "NameError", r.error
    frames = re.findall(r"Cell In\[\d+\], line (\d+)", tb)
    assert frames == ["2"], tb
    assert "----> 2 y = nope + 1" in tb, tb


# ---------------------------------------------------------------------------- remote errors

CELL = """\
def helper(a, b):
    return a / b

def compute():
    return helper(1, 0)

compute()
"""


def test_a_flash_cell_fails_as_the_same_cell_run_here(kernel, name):
    """The issue's example: every frame as a local run shows it (the function names and
    signatures, the lines, the arrow), and nothing else but the note saying where."""
    local = kernel.run(CELL)
    assert local.error is not None and local.error["ename"] == "ZeroDivisionError", local
    assert "in compute()" in local.traceback and "in helper(a, b)" in local.traceback
    remote = kernel.run(f"%%flash name={name}\n{CELL}")
    tb = nothing_of_ours(remote)
    assert remote.error["ename"] == "ZeroDivisionError", remote.error
    note = f"(raised remotely: endpoint {name}, worker {name}-1 (cpu3c-2-4))"
    assert tb.rstrip().endswith("\n" + note), tb
    assert same_cell(tb.rstrip()[: -len(note)].rstrip()) == same_cell(local.traceback.rstrip())


def test_a_decorated_function_fails_as_the_same_function_run_here(kernel, name):
    """A cell calling an ``@Endpoint`` function shows the same traceback as when the
    decorator does nothing: the caller's frames here, then the remote ones."""
    cell = (
        "@deco\n"
        "def helper(a, b):\n"
        "    return a / b\n"
        "\n"
        "def compute():\n"
        "    return helper(1, 0)\n"
        "\n"
        "compute()\n"
    )
    kernel.ok("deco = lambda f: f")
    local = kernel.run(cell)
    assert local.error is not None and local.error["ename"] == "ZeroDivisionError", local
    kernel.ok(f"from flash_jupyter import Endpoint\ndeco = Endpoint(name={name!r})")
    remote = kernel.run(cell)
    tb = nothing_of_ours(remote)
    assert remote.error["ename"] == "ZeroDivisionError", remote.error
    note = f"(raised remotely: endpoint {name}, worker {name}-1 (cpu3c-2-4))"
    assert tb.rstrip().endswith("\n" + note), tb
    assert same_cell(tb.rstrip()[: -len(note)].rstrip()) == same_cell(local.traceback.rstrip())
    headers = re.findall(r"Cell In\[\d+\], line \d+.*", tb)
    assert [h.split(", ", 1)[1] for h in headers] == [
        "line 8", "line 6, in compute()", "line 3, in helper(a, b)",
    ], tb  # fmt: skip


# ---------------------------------------------------------------------------- interrupts


def _interrupt(kernel: Kernel, code: str, http, name: str) -> Result:
    msg_id, sent = kernel.send(code)
    wait_for(lambda: any("started" in m.text for m in kernel.msgs if m.parent == msg_id),
             what="the job to start")  # fmt: skip
    kernel.interrupt()
    return kernel.wait(msg_id, sent, timeout=15)


def _cancelled_job(http, name: str, r: Result) -> dict:
    m = re.fullmatch(rf"cancelled job ([0-9a-f]{{8}}) on endpoint {name} \(worker (\S+)\)",
                     r.error["evalue"])  # fmt: skip
    assert m, r.error["evalue"]
    prefix, worker = m.groups()
    job = wait_for(lambda: next((j for j in jobs(http, name) if j["id"].startswith(prefix)
                                 and j["status"] == "CANCELLED"), None),
                   what="the job to be CANCELLED")  # fmt: skip
    assert job.get("workerId") == worker, job
    return job


def test_an_interrupted_cell_says_which_job_was_cancelled(kernel, name, http):
    r = _interrupt(kernel, f"%%flash name={name}\nimport time\nprint('started', flush=True)\n"
                   "time.sleep(60)", http, name)  # fmt: skip
    tb = nothing_of_ours(r)
    assert r.error["ename"] == "KeyboardInterrupt", r.error
    assert tb.strip() == f"KeyboardInterrupt: {r.error['evalue']}", tb
    _cancelled_job(http, name, r)


def test_an_interrupted_call_says_which_job_was_cancelled(kernel, name, http):
    kernel.ok(
        "from flash_jupyter import Endpoint\n"
        f"@Endpoint(name={name!r})\n"
        "def slow():\n"
        "    import time\n"
        "    print('started', flush=True)\n"
        "    time.sleep(60)\n"
    )
    r = _interrupt(kernel, "for i in range(3):\n    slow()", http, name)
    tb = nothing_of_ours(r)
    assert r.error["ename"] == "KeyboardInterrupt", r.error
    assert "----> 2     slow()" in tb, tb
    assert len(re.findall(r"Cell In\[\d+\], line \d+", tb)) == 1, tb  # the user's line only
    _cancelled_job(http, name, r)
    assert kernel.value("i") == "0", "the loop stopped at the interrupt"
