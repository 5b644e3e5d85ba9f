"""Live receipts, progress bars, ``%flash budget`` and ``%flash cost`` in a real ipykernel.

What a front end sees: the iopub ``display_data`` that shows a receipt and the
``update_display_data`` messages that move it (same display id), each a text/plain and a
text/html bundle whose metadata (``flash_jupyter``) says the state. Calls are made slow by
sleeping inside the remote code, and a cold start slow by a dependency environment to
build (a wheel made here, no network); nothing asserts on elapsed wall time.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import wait_for
from test_dependencies import make_wheel

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

import notebook_kernel as nk
from kernel import Result, strip_ansi
from notebook_kernel import start_kernel

http = nk.http
_stop_endpoints = nk._stop_endpoints  # autouse

ORDER = {"Queued": 0, "Cold start": 1, "Running": 2, "Done": 3}
PHASES = {"environment", "process", "code"}


@pytest.fixture(scope="module")
def kernel(server, tmp_path_factory):
    """A kernel with receipts turned on (the notebook tests' kernels have them off)."""
    k = start_kernel(server, tmp_path_factory.mktemp("receipts"))
    out = k.ok("%flash config receipts=on").stdout
    assert "receipts: on" in out, out
    yield k
    k.shutdown()


def shown(msgs) -> list:
    """The receipt or progress displays among messages, in order: (type, bundle, meta)."""
    out = []
    for m in msgs:
        if m.type in ("display_data", "update_display_data"):
            meta = (m.content.get("metadata") or {}).get("flash_jupyter")
            if meta is not None:
                out.append((m, m.content["data"], meta))
    return out


def receipts(r: Result) -> list:
    return [x for x in shown(r.msgs) if x[2]["kind"] == "receipt"]


def check_one_display(items) -> None:
    """A display made once, then updated in place; every bundle text/plain and text/html,
    never a widget's repr."""
    assert items, "nothing shown"
    first, *rest = items
    assert first[0].type == "display_data"
    assert all(m.type == "update_display_data" for m, _, _ in rest)
    ids = {m.content["transient"]["display_id"] for m, _, _ in items}
    assert len(ids) == 1, ids
    for _, data, _ in items:
        assert set(data) == {"text/plain", "text/html"}, data.keys()
        assert "\n" not in data["text/plain"]
    assert "VBox(" not in json.dumps([m.content for m, _, _ in items])


def states(items) -> list[str]:
    seq = [meta["state"] for _, _, meta in items]
    return [s for i, s in enumerate(seq) if i == 0 or s != seq[i - 1]]


def no_display(r: Result) -> None:
    kinds = [m.type for m in r.msgs]
    assert "display_data" not in kinds and "update_display_data" not in kinds, r.msgs


# ---------------------------------------------------------------------------- one call


def test_cold_then_warm_cell_receipts(kernel, name, tmp_path):
    wheel = make_wheel(tmp_path)
    cell = (f"%%flash name={name} gpu=A100 dependencies={wheel}\n"
            "import time, fjtinypkg\n"
            "time.sleep(1.5)\n"
            "fjtinypkg.VALUE\n")  # fmt: skip
    # Shown from the start: the cold start (an environment built with uv in well under a
    # second here) must not end before the half second after which a receipt appears.
    kernel.ok("import flash_jupyter.jupyter.receipts as _r; _r.SHOW_AFTER = 0")
    try:
        r = kernel.run(cell, timeout=180).ok()
    finally:
        kernel.ok("_r.SHOW_AFTER = 0.5")
    assert r.value["text/plain"] == "42"
    items = receipts(r)
    check_one_display(items)
    seen = states(items)
    assert seen[-1] == "Done", seen
    assert "Cold start" in seen and "Running" in seen, (seen, items[-1][2]["receipt"])
    ranks = [ORDER[s] for s in seen]
    assert ranks == sorted(ranks), seen  # never backwards
    phases = [meta["phase"] for _, _, meta in items if meta["state"] == "Cold start"]
    assert "environment" in phases, phases  # building the environment, shown live
    assert set(phases) <= PHASES, phases
    live = [data["text/plain"] for _, data, meta in items if meta["state"] == "Cold start"]
    assert any("building the environment" in t for t in live), live
    # The receipt: one line, after the live status, above the cell's result.
    last_data, last = items[-1][1], items[-1][2]
    text = last_data["text/plain"]
    f = last["receipt"]
    assert text.startswith("✓ Done · " + name + " · A100"), text
    assert f["hardware"].startswith("A100"), f
    assert f["cold"] is True and " · cold · " in text, text
    for part in ("queue ", "cold start ", "run ", " at $"):
        assert part in text, (part, text)
    assert f["cold_start_s"] > 0 and f["run_s"] >= 1.5 and f["queue_s"] >= 0, f
    assert set(f["cold_start_phases_s"]) <= PHASES and f["cold_start_phases_s"], f
    assert f["cost_cold_start"] > 0 and f["cost_run"] > 0, f
    assert f["cost"] == pytest.approx(f["cost_run"] + f["cost_cold_start"]), f
    assert f["cost_cold_start"] == pytest.approx(f["cold_start_s"] * f["price_per_second"],
                                                 rel=0.05, abs=1e-6)  # fmt: skip
    assert "cold start" in re.search(r"\$[\d.e-]+ \((.*)\)$", text).group(1), text
    assert text in strip_ansi(last_data["text/html"]) or name in last_data["text/html"]

    # The same cell again: a warm worker, no cold start, only its run is billed.
    r = kernel.run(cell, timeout=60).ok()
    items = receipts(r)
    check_one_display(items)
    seen = states(items)
    assert seen[-1] == "Done" and "Cold start" not in seen and "Running" in seen, seen
    text, f = items[-1][1]["text/plain"], items[-1][2]["receipt"]
    assert f["cold"] is False and " · warm · " in text and "cold start" not in text, text
    assert f["cost_cold_start"] == 0 and f["cost"] == pytest.approx(f["cost_run"]), f


def test_failed_cell_ends_its_receipt_as_failed(kernel, name):
    r = kernel.run(f"%%flash name={name}\nimport time\ntime.sleep(1)\nraise ValueError('no')")
    assert r.error is not None and r.error["ename"] == "ValueError", r
    items = receipts(r)
    check_one_display(items)
    assert states(items)[-1] == "Failed"
    assert items[-1][1]["text/plain"].startswith("✗ Failed · " + name)


def test_fast_warm_calls_show_nothing_slow_ones_a_receipt(kernel, name):
    kernel.ok(
        "from flash_jupyter import Endpoint\n"
        f"@Endpoint(name='{name}', workers=(1, 1))\n"
        "def nap(s):\n"
        "    import time\n"
        "    time.sleep(s)\n"
        "    return s\n"
    )
    kernel.ok("nap(0)", timeout=60)  # the worker is warm from here on
    wait_for(lambda: kernel.value("nap.status()['health']['workers']['ready']") == "1")
    r = kernel.ok("[nap(0) for _ in range(20)]")
    no_display(r)
    r = kernel.ok(f"%%flash name={name}-cell\n1")  # (its worker cold-starts: not asserted)
    r = kernel.ok(f"%%flash name={name}-cell\n1 + 1")
    no_display(r)
    # A slow call made from a cell's loop shows its receipt, once per slow call.
    r = kernel.ok("for s in (0, 1.0):\n    nap(s)\n")
    items = receipts(r)
    check_one_display(items)
    text = items[-1][1]["text/plain"]
    assert text.startswith(f"✓ Done · {name} · ") and " · warm · " in text, text


def test_the_receipt_stands_above_the_output(kernel, name):
    """Output that comes before the receipt shows is held back until it does: the receipt is
    above what the cell prints; a fast cell prints and shows no receipt."""
    kernel.ok(f"%%flash name={name}\n1", timeout=60)  # warm
    r = kernel.ok(f"%%flash name={name}\nprint('first', flush=True)\nimport time\n"
                  "time.sleep(1.0)\nprint('last')")  # fmt: skip
    order = [
        "receipt" if m.type in ("display_data", "update_display_data") else m.content["text"]
        for m in r.msgs
        if m.type in ("display_data", "update_display_data", "stream")
    ]
    assert order[0] == "receipt" and "first\n" in order and "last\n" in order, order
    r = kernel.ok(f"%%flash name={name}\nprint('quick')")
    no_display(r)
    assert r.stdout == "quick\n"


def test_receipts_off_show_nothing(kernel, name):
    out = kernel.ok("%flash config receipts=off").stdout
    assert "receipts: off" in out
    try:
        r = kernel.ok(f"%%flash name={name}\nimport time\ntime.sleep(1)\n'slow'", timeout=60)
        no_display(r)
        assert r.value["text/plain"] == "'slow'"
        # Back to the environment's setting: FLASH_JUPYTER_RECEIPTS=0 in this kernel.
        kernel.ok("import flash_jupyter.jupyter.receipts as _r; _r.set_enabled(None)")
        out = kernel.ok("%flash config").stdout
        assert "receipts: off" in out, out
        no_display(kernel.ok(f"%%flash name={name}\nimport time\ntime.sleep(1)", timeout=60))
    finally:
        kernel.ok("%flash config receipts=on")
    r = kernel.run("%flash config receipts=maybe")
    assert r.error is not None and r.error["ename"] == "ConfigError"
    assert "receipts takes on or off" in r.error["evalue"]
    assert "receipts=on|off" in kernel.run("%flash?").ok().pager
    # A display setting, never an endpoint's: it is not among the %%flash defaults.
    assert "receipts" not in kernel.ok("%flash config").stdout.split("\n")[0]


# ---------------------------------------------------------------------------- many jobs


def test_map_shows_one_progress_bar_with_the_counts(kernel, name):
    kernel.ok(
        "from flash_jupyter import Endpoint\n"
        f"@Endpoint(name='{name}', workers=(0, 2))\n"
        "def slow_square(x):\n"
        "    import time\n"
        "    time.sleep(0.4)\n"
        "    return x * x\n"
    )
    r = kernel.ok("slow_square.map(range(8))", timeout=60)
    assert r.value["text/plain"] == "[0, 1, 4, 9, 16, 25, 36, 49]"
    items = shown(r.msgs)
    assert all(meta["kind"] == "progress" for _, _, meta in items), items
    check_one_display(items)
    end = items[-1][2]
    assert end["finished"] and end["total"] == 8, end
    assert end["counts"] == {"done": 8, "failed": 0, "running": 0, "queued": 0}, end
    assert "8/8" in items[-1][1]["text/plain"] and "done 8" in items[-1][1]["text/plain"]
    # Redrawn only when a count changed, and at a bounded rate.
    counts = [json.dumps(meta["counts"]) for _, _, meta in items[:-1]]
    assert len(counts) == len(set(counts)), counts
    # A map done in under a second shows no bar.
    kernel.ok(
        f"@Endpoint(name='{name}-fast', workers=(1, 1))\ndef ident(x):\n    return x\nident(0)\n",
        timeout=60,
    )
    no_display(kernel.ok("ident.map(range(20))"))


def test_failing_map_bar_ends_with_the_failure(kernel, name):
    kernel.ok(
        "from flash_jupyter import Endpoint\n"
        f"@Endpoint(name='{name}', workers=(0, 1))\n"
        "def fails_at_2(x):\n"
        "    import time\n"
        "    time.sleep(0.5)\n"
        "    if x == 2:\n"
        "        raise ValueError('two')\n"
        "    return x\n"
    )
    r = kernel.run("fails_at_2.map(range(5))", timeout=60)
    assert r.error is not None and r.error["ename"] == "ValueError"
    items = shown(r.msgs)
    check_one_display(items)
    end = items[-1][2]
    assert end["finished"] and end["counts"]["done"] == 2 and end["counts"]["failed"] == 1, end
    assert "stopped: item 2 raised" in items[-1][1]["text/plain"]


def test_noblock_cells_share_one_bar(kernel, name):
    cell = f"%%flash name={name} workers=0,2 --noblock -o {{o}}\nimport time\ntime.sleep(1.5)\n"
    first = kernel.ok(cell.format(o="j1"), timeout=60)
    second = kernel.ok(cell.format(o="j2"), timeout=60)
    kernel.ok("j1.result(); j2.result()", timeout=60)

    def bar():
        items = shown(m for m in kernel.msgs if m.parent == first.msg_id)
        return items if items and items[-1][2]["finished"] else None

    items = wait_for(bar, what="the batch's bar to finish")
    check_one_display(items)
    end = items[-1][2]
    assert end["total"] == 2 and end["counts"]["done"] == 2, end
    assert not shown(m for m in kernel.msgs if m.parent == second.msg_id)


# ---------------------------------------------------------------------------- budget and cost


@pytest.fixture
def own_kernel(own_server, tmp_path):
    """A kernel on a control plane of its own: a budget or a bill of its own."""
    k = start_kernel(own_server(), tmp_path)
    yield k
    k.shutdown()


def test_budget_refuses_with_one_line(own_kernel, name):
    k = own_kernel
    out = k.ok("%flash budget").stdout
    assert "no limit" in out, out
    for bad in ("-1", "abc", "nan", "inf"):
        r = k.run(f"%flash budget {bad}")
        assert r.error is not None and r.error["ename"] == "ConfigError", (bad, r)
        assert "%flash budget 2.50" in r.error["evalue"]
    k.ok(f"%%flash name={name}\nimport time\ntime.sleep(0.2)")  # something is spent
    out = k.ok("%flash budget 0.000000001").stdout
    assert "budget for this session: $0.000000001," in out, out
    wait_for(lambda: "REACHED" in k.ok("%flash budget").stdout, what="the budget reached")
    r = k.run(f"%%flash name={name}\n1")
    assert r.error is not None and r.error["ename"] == "BudgetExceeded", r
    assert "budget" in r.error["evalue"]
    lines = [ln for ln in r.traceback.splitlines() if ln.strip()]
    assert len(lines) == 1 and "BudgetExceeded" in lines[0], r.traceback  # no frames
    # A call of a function refused the same way: the one line, not the caller's frames.
    k.ok(f"from flash_jupyter import Endpoint\nf = Endpoint(name='{name}-fn')(lambda: 1)")
    r = k.run("f()")
    assert r.error is not None and r.error["ename"] == "BudgetExceeded", r
    lines = [ln for ln in r.traceback.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("BudgetExceeded: "), r.traceback
    # Off again: jobs run.
    assert "no limit" in k.ok("%flash budget off").stdout
    assert k.value(f"%%flash name={name}\n6 * 7") == "42"
    # One endpoint's limit holds that endpoint only.
    out = k.ok(f"%flash budget 0.000000001 --endpoint {name}").stdout
    assert f"endpoint {name}: $0.000000001" in out, out
    r = k.run(f"%%flash name={name}\n1")
    assert r.error is not None and r.error["ename"] == "BudgetExceeded", r
    assert k.value(f"%%flash name={name}-other\n2") == "2"
    r = k.run("%flash status --endpoint x")
    assert r.error is not None and "--endpoint goes with %flash budget" in r.error["evalue"]


def test_cost_table(own_kernel, name):
    k = own_kernel
    r = k.ok("%flash cost")
    text = r.displays[0].content["data"]["text/plain"]
    assert "no GPU cell or call in this kernel yet" in text, text
    k.ok(f"%%flash name={name}-gpu gpu=A100\nimport time\ntime.sleep(0.2)", timeout=60)
    k.ok(f"%%flash name={name}-cpu\n1", timeout=60)
    r = k.ok("%flash cost")
    [d] = r.displays
    text, page = d.content["data"]["text/plain"], d.content["data"]["text/html"]
    rows = {ln.split()[0]: ln.split() for ln in text.splitlines() if ln.startswith(name)}
    assert set(rows) == {f"{name}-gpu", f"{name}-cpu"}, text
    gpu = rows[f"{name}-gpu"]
    assert gpu[1] == "A100" and gpu[-1].startswith("$") and gpu[-2] == "1", gpu  # 1 cold start
    assert "a whole-kernel GPU notebook" in text and "A100 since" in text, text
    assert "flash (billed)" in text and "whole-kernel GPU" in text and "█" in text, text
    assert "<table>" in page and f"{name}-gpu" in page and "background:" in page
    assert "VBox(" not in text + page


def test_status_shows_the_dashboard_or_text(kernel, name):
    kernel.ok(f"%%flash name={name}\n1")
    r = kernel.ok("%flash status")
    shown_text = r.stdout + "".join(m.content["data"].get("text/plain", "") for m in r.displays)
    assert name in shown_text, r.msgs
    assert "VBox(" not in shown_text
    assert name in kernel.ok("%flash status --text").stdout
