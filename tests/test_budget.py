"""The spending guard on a real control plane (each test its own: a reached budget holds
every endpoint): refusals over HTTP and the wire, running jobs finish, idle workers stop,
the limit survives a restart, bad limits are 400s, and the CLI."""

from __future__ import annotations

import pytest
from conftest import Server, free_port, use_server, wait_for

import flash_jupyter
from flash_jupyter import Endpoint, cli

TINY = 0.00001  # a worker's first billed second costs more than this


def live_workers(c, name: str) -> list[dict]:
    return [w for w in c.endpoint(name)["workers"] if w["pid"] is not None]


def test_reached_budget_refuses_http_and_python_calls_and_stops_idle_workers(
    own_server, monkeypatch, name
):
    s = own_server()
    c = use_server(s, monkeypatch)

    @Endpoint(name=name, workers=(0, 1), idle_timeout=300)
    def double(x):
        return 2 * x

    assert double(2) == 4  # a worker starts and is billed
    assert c.budget()["state"] == "ok" and c.budget()["limit"] is None
    view = c.set_budget(TINY)
    assert view["state"] == "reached" and view["spent"] > TINY
    assert view["endpoints"][name]["spent"] > 0 and view["near_fraction"] == 0.8

    # HTTP: 402 with what to do, before anything is recorded.
    with s.http() as api:
        for route in ("run", "runsync"):
            r = api.post(f"/v2/{name}/{route}", json={"input": {"x": 1}})
            assert r.status_code == 402, r.text
            msg = r.json()["error"]
            assert msg.startswith("budget of $0.00001 for this session reached ($0.0000"), msg
            assert "`flash-jupyter budget" in msg and "`%flash budget" in msg
        assert api.get("/v1/jobs", params={"endpoint": name}).json()[-1]["status"] == "COMPLETED"
        assert len(api.get("/v1/jobs", params={"endpoint": name}).json()) == 1
        assert api.post(f"/v1/endpoints/{name}/warm", json={}).status_code == 402

    # Python: the call raises BudgetExceeded (a FlashError), from the wire's refusal.
    with pytest.raises(flash_jupyter.BudgetExceeded, match="raise it with") as e:
        double(3)
    assert isinstance(e.value, flash_jupyter.FlashError)
    # The idle worker stopped at once (idle_timeout is 300 s).
    wait_for(lambda: live_workers(c, name) == [], what="the idle worker to stop")

    # Raised again: calls go through.
    assert c.set_budget(None)["state"] == "ok"
    assert double(5) == 10


def test_running_job_finishes_then_its_worker_stops(own_server, monkeypatch, name, tmp_path):
    s = own_server()
    c = use_server(s, monkeypatch)
    flag = tmp_path / "go"

    @Endpoint(name=name, workers=(0, 1), idle_timeout=300)
    def wait_for_flag(path):
        import os
        import time

        while not os.path.exists(path):
            time.sleep(0.02)
        return "finished"

    job = wait_for_flag.submit(str(flag))
    wait_for(lambda: any(w["busy"] for w in c.endpoint(name)["workers"]), what="the job to run")
    assert c.set_budget(TINY, endpoint=name)["endpoints"][name]["state"] == "reached"
    with pytest.raises(flash_jupyter.BudgetExceeded, match=f"for endpoint '{name}' reached"):
        wait_for_flag(str(flag))
    assert len(live_workers(c, name)) == 1  # busy: it stays
    flag.touch()
    assert job.result(timeout=30) == "finished"
    wait_for(lambda: live_workers(c, name) == [], what="the worker to stop once idle")


def test_budget_survives_a_restart_of_the_control_plane(own_server, monkeypatch, name):
    s = own_server()
    c = use_server(s, monkeypatch)
    with s.http() as api:
        r = api.put(f"/v1/endpoints/{name}", json={"changes": {"workers": [0, 1]}})
        assert r.status_code == 200 and r.json()["action"] == "created"
        assert api.put("/v1/budget", json={"limit": 2.5}).json()["limit"] == 2.5
        view = api.put("/v1/budget", json={"limit": 1, "endpoint": name}).json()
        assert view["endpoints"][name] == {"limit": 1.0, "spent": 0.0, "state": "ok"}
    s.stop()
    again = Server(s.data_dir, s.token, free_port(), free_port()).start()
    try:
        c = use_server(again, monkeypatch)
        view = c.budget()
        assert view["limit"] == 2.5 and view["endpoints"][name]["limit"] == 1.0
        assert view["state"] == "ok" and view["spent"] == 0  # a new session's spend
    finally:
        again.stop()


BAD = [
    ({"limit": -1}, 400),
    ({"limit": "five"}, 400),
    ({"limit": True}, 400),
    ({"limit": [1]}, 400),
    ({}, 400),
    ({"limit": 1, "extra": 2}, 400),
    ({"limit": 1, "endpoint": "ghost-endpoint"}, 404),
    ({"limit": 1, "endpoint": 7}, 400),
]


def test_bad_limits_are_refused_and_change_nothing(own_server):
    s = own_server()
    with s.http() as api:
        for body, status in BAD:
            r = api.put("/v1/budget", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"], body
        for raw in (b'{"limit": NaN}', b'{"limit": Infinity}', b'{"limit": 1e999}', b"[1]"):
            r = api.put("/v1/budget", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (raw, r.text)
        assert api.get("/v1/budget").json()["limit"] is None
        assert api.put("/v1/budget", json={"limit": "off"}).json()["limit"] is None


def test_cli_budget(own_server, monkeypatch, capsys):
    s = own_server()
    use_server(s, monkeypatch)
    assert cli.main(["budget"]) == 0
    assert capsys.readouterr().out.startswith("budget for this session: no limit ($0 spent)")
    assert cli.main(["budget", "2.50"]) == 0
    assert capsys.readouterr().out.strip() == "budget for this session: $2.50, $0 spent, 0%: ok"
    assert cli.main(["budget", "lots"]) == 2
    assert "a number of US dollars" in capsys.readouterr().err
    assert cli.main(["budget", "nan"]) == 2
    assert cli.main(["budget", "off"]) == 0
    assert "no limit" in capsys.readouterr().out
