"""The live dashboard (``flash_jupyter.dashboard()``): its cards as pure functions of the
endpoint views, and the widget in a real ipykernel against the real control plane: cards for
endpoints made by the notebook and over HTTP, the text and HTML fallbacks, the buttons acting
on the control plane, and a kernel that stays responsive with 20 endpoints."""

from __future__ import annotations

import time

import pytest
from conftest import wait_for

pytest.importorskip("ipywidgets")

from flash_jupyter.jupyter import dashboard_cards as cards

# ---------------------------------------------------------------- cards: pure functions


def view(name="ep", workers=(), **extra):
    v = {
        "name": name,
        "hardware": "A100",
        "emulated": True,
        "config": {"workers_min": 0, "workers_max": 3, "idle_timeout": 30.0, "gpu": ["A100"],
                   "gpu_count": 1, "dependencies": ["numpy"]},
        "health": {"jobs": {"inQueue": 2, "inProgress": 1, "completed": 5, "failed": 1,
                              "retried": 0}},
        "queue": 2,
        "starts": {"cold": 2, "warm": 7, "last_cold_ms": 3200.0, "mean_cold_ms": 2500.0},
        "workers": list(workers),
        "cost": 0.5,
        "session_cost": 0.25,
    }  # fmt: skip
    v.update(extra)
    return v


def worker(wid, state, **extra):
    w = {"id": wid, "state": state, "busy": False, "jobs": [], "hardware_label": "A100",
         "cold_start_ms": None, "billed_seconds": 0, "cost": 0, "reason": "", "phase": None,
         "scale_down_in_s": None, "remote_state": {}, "lost_state": {}}  # fmt: skip
    w.update(extra)
    return w


def test_card_shows_settings_counts_states_and_cost():
    ws = [
        worker("ep-0", "Initializing", phase="environment", billed_seconds=3, cost=0.01),
        worker("ep-1", "Running", busy=True, jobs=["j1"], billed_seconds=40, cost=0.1),
        worker("ep-2", "Running", scale_down_in_s=25.0, _at=100.0, billed_seconds=9),
        worker("ep-3", "Throttled"),
        worker("ep-4", "Outdated", billed_seconds=2),
        worker("ep-5", "Unhealthy", reason="exited at start"),
        worker("ep-6", "Idle"),
    ]
    kept = {"notebook": "analysis.ipynb", "names": ["df", "model"], "bytes": 2_500_000}
    ws[1]["remote_state"] = {"/n/analysis.ipynb": kept}
    html = cards.card_html(view(workers=ws), now=110.0)
    assert "<b>ep</b>" in html and "A100, emulated on CPU" in html
    assert "workers 0..3" in html and "idle timeout 30 s" in html and "numpy" in html
    assert "queue 2" in html and "cold starts 2 (last 3.2 s, mean 2.5 s)" in html
    assert "warm starts 7" in html
    for state, colour in cards.STATE_COLOURS.items():
        assert f"background:{colour}" in html, state
        assert f">{state}<" in html
    assert "building the environment" in html
    assert "scales down in 15 s" in html  # 25 s when it arrived, 10 s ago
    assert html.count("billed: this worker has a process") == 4
    assert "exited at start" in html
    assert "ep-1 keeps analysis.ipynb's df, model (2.5 MB)" in html
    assert "cost this session $0.25, all time $0.50 (estimate: emulated on CPU)" in html
    assert cards.has_countdown(view(workers=ws))
    assert not cards.has_countdown(view(workers=ws[:2]))


def test_countdown_runs_from_arrival_and_stops_at_zero():
    w = worker("w", "Running", scale_down_in_s=5.0, _at=10.0)
    assert cards.countdown(w, 12.0) == 3.0
    assert cards.countdown(w, 30.0) == 0.0
    assert cards.countdown({**w, "busy": True}, 12.0) is None
    assert cards.countdown({**w, "scale_down_in_s": None}, 12.0) is None


def test_budget_near_and_reached_are_highlighted():
    budget = {"limit": 2.0, "spent": 1.7, "state": "near",
              "endpoints": {"ep": {"limit": 1.0, "spent": 1.0, "state": "reached"}}}  # fmt: skip
    head = cards.header_html([view()], budget)
    assert "session budget $1.70 of $2.00 (near the limit)" in head
    assert cards.BUDGET_COLOURS["near"] in head
    card = cards.card_html(view(), 0.0, budget)
    assert "budget $1.00 of $1.00 (reached: new jobs are refused)" in card
    assert cards.BUDGET_COLOURS["reached"] in card
    assert "no budget" in cards.header_html([view()], None)
    text = cards.page_text([view()], budget)
    assert "session budget $1.70 of $2.00 (near)" in text


# ---------------------------------------------------------------- in a real kernel

pytest.importorskip("ipykernel")
import notebook_kernel as nk  # noqa: E402
from notebook_kernel import endpoint  # noqa: E402

kernel, http = nk.kernel, nk.http
_stop_endpoints = nk._stop_endpoints  # autouse


def in_kernel(kernel, expr: str, what: str, timeout: float = 30) -> None:
    """Wait until ``expr`` is true in the kernel (the dashboard updates on its own thread)."""
    wait_for(lambda: kernel.value(f"bool({expr})") == "True", timeout=timeout, what=what)


def test_dashboard_shows_notebook_and_http_endpoints_with_fallbacks(kernel, http, name):
    nb, other = f"{name}-nb", f"{name}-http"
    kernel.ok(f"%%flash name={nb} workers=0,1 idle_timeout=30\nx = 1\n", timeout=60)
    r = http.put(f"/v1/endpoints/{other}", json={"cpu": "cpu3c-2-4", "workers": [0, 2]})
    assert r.status_code == 200, r.text
    try:
        kernel.ok("import flash_jupyter\nd = flash_jupyter.dashboard()")
        in_kernel(kernel, f"{{{nb!r}, {other!r}}} <= set(d.cards)", "both cards")
        assert kernel.value("flash_jupyter.dashboard() is d") == "True"
        body = kernel.value(f"d.cards[{other!r}].body.value")
        assert "workers 0..2" in body and "cpu3c-2-4" in body
        in_kernel(kernel, f"'Running' in d.cards[{nb!r}].body.value", "the notebook's worker")

        bundle = kernel.run("d").ok().value
        assert "application/vnd.jupyter.widget-view+json" in bundle
        plain, html = bundle["text/plain"], bundle["text/html"]
        assert "VBox(" not in plain and "VBox(" not in html
        assert nb in plain and other in plain and "session cost" in plain
        assert f'data-endpoint="{nb}"' in html and f'data-endpoint="{other}"' in html
        assert "VBox(" not in kernel.value("repr(d)")
        # %flash status shows the same live dashboard, with the same fallbacks.
        shown = [m.content["data"] for m in kernel.run("%flash status").ok().displays]
        board = [b for b in shown if "application/vnd.jupyter.widget-view+json" in b]
        assert len(board) == 1, shown
        assert "VBox(" not in board[0]["text/plain"] and nb in board[0]["text/plain"]
        assert f'data-endpoint="{nb}"' in board[0]["text/html"]

        # An endpoint deleted elsewhere leaves the dashboard.
        assert http.delete(f"/v1/endpoints/{other}").status_code == 200
        in_kernel(kernel, f"{other!r} not in d.cards", "the deleted endpoint's card to go")
    finally:
        http.delete(f"/v1/endpoints/{other}")
        http.delete(f"/v1/endpoints/{nb}")


def states(http, name: str) -> list[str]:
    return [w["state"] for w in endpoint(http, name)["workers"]]


def test_buttons_warm_stop_purge_scale_delete(kernel, http, name):
    kernel.ok(
        "import flash_jupyter\nfrom flash_jupyter import Endpoint\n"
        f"@Endpoint(name={name!r}, workers=(0, 1), idle_timeout=60)\n"
        "def slow(t):\n    import time\n    time.sleep(t)\n    return t\n"
        "slow.deploy()\nd = flash_jupyter.dashboard()\n"
    )
    in_kernel(kernel, f"{name!r} in d.cards", "the card")
    kernel.ok(f"card = d.cards[{name!r}]")
    assert endpoint(http, name)["workers"] == [] or set(states(http, name)) == {"Idle"}

    # Warm: a worker starts without a job, and the card shows it counting down.
    kernel.ok("card.warm_button.click()")
    assert "failed" not in kernel.value("card.message.value")
    wait_for(lambda: "Running" in states(http, name), timeout=60, what="the warmed worker")
    in_kernel(kernel, "'scales down in' in card.body.value", "the scale-down countdown")

    # Stop: the idle worker goes.
    kernel.ok("card.stop_button.click()")
    assert "failed" not in kernel.value("card.message.value")
    wait_for(
        lambda: not any(w["billed_seconds"] for w in endpoint(http, name)["workers"]),
        timeout=30,
        what="the stopped worker",
    )

    # Purge: one job runs, two wait; the button cancels the two.
    ids = []
    for _ in range(3):
        r = http.post(f"/v2/{name}/run", json={"input": {"t": 120}})
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    wait_for(lambda: endpoint(http, name)["queue"] == 2, timeout=60, what="two queued jobs")
    in_kernel(kernel, "'queue 2' in card.body.value", "the card's queue depth")
    kernel.ok("card.purge_button.click()")
    assert "2 queued jobs cancelled" in kernel.value("card.message.value")
    assert endpoint(http, name)["queue"] == 0
    cancelled = [http.get(f"/v2/{name}/status/{j}").json()["status"] for j in ids]
    assert cancelled.count("CANCELLED") == 2, cancelled

    # Scale: the range typed in the card.
    kernel.ok("card.min_input.value, card.max_input.value = 0, 3\ncard.scale_button.click()")
    assert "failed" not in kernel.value("card.message.value")
    cfg = endpoint(http, name)["config"]
    assert (cfg["workers_min"], cfg["workers_max"]) == (0, 3)

    # Delete asks first; "Keep it" keeps it, "Delete it" deletes it.
    kernel.ok("card.delete_button.click()")
    assert kernel.value("card.confirm_box.layout.display") == "'flex'"
    kernel.ok("card.cancel_button.click()")
    assert kernel.value("card.confirm_box.layout.display") == "'none'"
    assert http.get(f"/v1/endpoints/{name}").status_code == 200
    kernel.ok("card.delete_button.click()\ncard.confirm_button.click()")
    assert http.get(f"/v1/endpoints/{name}").status_code == 404
    in_kernel(kernel, f"{name!r} not in d.cards", "the deleted card to go")

    # An action that fails says so in the card; the cell does not raise.
    kernel.ok("card.stop_button.click()")
    msg = kernel.value("card.message.value")
    assert "stop failed" in msg and "404" in msg, msg


def test_twenty_endpoints_one_card_each_and_a_responsive_kernel(kernel, http, name):
    names = [f"{name}-{i:02d}" for i in range(20)]
    try:
        kernel.ok("import flash_jupyter\nd = flash_jupyter.dashboard()")
        for n in names:
            r = http.put(f"/v1/endpoints/{n}", json={"cpu": "cpu3c-2-4", "idle_timeout": 5})
            assert r.status_code == 200, r.text
        # Meanwhile the kernel answers a trivial execute.
        sent = time.monotonic()
        assert kernel.run("1 + 1").ok().value["text/plain"] == "2"
        assert time.monotonic() >= sent
        prefix = f"{name}-"
        in_kernel(kernel, f"len([n for n in d.cards if n.startswith({prefix!r})]) == 20",
                  "20 cards")  # fmt: skip
        # Updates to every endpoint at once are coalesced: the kernel still answers.
        for n in names:
            http.post(f"/v1/endpoints/{n}/scale", json={"min": 0, "max": 2})
        assert kernel.run("2 + 2").ok().value["text/plain"] == "4"
        in_kernel(
            kernel,
            f"all('workers 0..2' in c.body.value for n, c in d.cards.items() "
            f"if n.startswith({prefix!r}))",
            "every card to show its new range",
        )
        assert kernel.value(f"len([n for n in d.cards if n.startswith({prefix!r})])") == "20"
    finally:
        for n in names:
            http.delete(f"/v1/endpoints/{n}")


def test_budget_shows_in_the_header_as_it_is_set(kernel, http):
    kernel.ok("import flash_jupyter\nd = flash_jupyter.dashboard()")
    try:
        r = http.put("/v1/budget", json={"limit": 123.0})
        assert r.status_code == 200, r.text
        in_kernel(kernel, "'of $123.00' in d.header.value", "the budget in the header")
        assert "of $123.00" in kernel.run("d").ok().value["text/plain"]
    finally:
        http.put("/v1/budget", json={"limit": None})
    in_kernel(kernel, "'no budget' in d.header.value", "the cleared budget")
