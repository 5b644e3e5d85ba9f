"""Warm-up, deploy by changes, progress frames, receipts' fields and start counts, on the
real control plane and real worker processes."""

from __future__ import annotations

import queue

from conftest import wait_for

from flash_jupyter import job as fj_job
from flash_jupyter import wire
from flash_jupyter.config import EndpointConfig


def ready_idle(c, name: str) -> list[dict]:
    return [w for w in c.endpoint(name)["workers"] if w["state"] == "Running" and not w["busy"]]


def test_warm_starts_workers_without_a_job_and_they_scale_down(client, api, name):
    r = api.put(f"/v1/endpoints/{name}", json={"changes": {"workers": [0, 2], "idle_timeout": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["action"] == "created" and r.json()["queue"] == 0
    # Changes keep the settings they do not name (the %%flash rule).
    r = api.put(f"/v1/endpoints/{name}", json={"changes": {"idle_timeout": 2}, "serves": "cells"})
    assert r.json()["action"] == "updated"
    assert r.json()["config"]["workers_max"] == 2 and r.json()["config"]["idle_timeout"] == 2
    r = api.put(f"/v1/endpoints/{name}", json={"changes": {"idle_timeout": 2}})
    assert r.json()["action"] == "reused"
    assert api.put(f"/v1/endpoints/{name}", json={"changes": {"gpus": "A100"}}).status_code == 400
    assert api.put(f"/v1/endpoints/{name}", json={"changes": 3}).status_code == 400

    view = client.warm(name, workers=5)  # capped at max
    assert view["started"] == 2 and view["config"]["workers_min"] == 0
    assert {w["phase"] for w in view["workers"]} <= {"environment", "process"}
    ws = wait_for(lambda: len(ready_idle(client, name)) == 2 and ready_idle(client, name),
                  what="two warm workers")  # fmt: skip
    for w in ws:
        assert w["phase"] is None and w["idle_timeout"] == 2
        assert w["scale_down_in_s"] is not None and 0 <= w["scale_down_in_s"] <= 2
    assert api.get("/v1/jobs", params={"endpoint": name}).json() == []  # no job ran
    wait_for(lambda: all(w["pid"] is None for w in client.endpoint(name)["workers"]),
             what="the warm workers to scale down")  # fmt: skip
    assert api.post("/v1/endpoints/no-such-endpoint/warm", json={}).status_code == 404
    for bad in (-1, 1.5, "two", True):
        r = api.post(f"/v1/endpoints/{name}/warm", json={"workers": bad})
        assert r.status_code == 400 and "workers" in r.json()["error"], bad


def _submit(client, name: str, x: int, progress: bool):
    def triple(v):
        return 3 * v

    fn = wire.dumps(triple, what="the function")
    call = wire.dumps_call(wire.Call((x,), {}), what="the call")
    return client.submit(name, fn, call, progress=progress)


def _events(state) -> list[tuple[str, dict]]:
    state.done.wait(60)
    out = []
    while True:
        try:
            out.append(state.events.get_nowait())
        except queue.Empty:
            return out


def test_progress_frames_for_a_cold_then_a_warm_job(client, api, name):
    cfg = EndpointConfig.build(name, workers=(0, 1), idle_timeout=30)
    client.deploy(cfg.to_dict())
    cold = _submit(client, name, 2, progress=True)
    events = _events(cold)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"progress"}, kinds
    seq = [(m["status"], m["phase"]) for k, m in events if k == "progress"]
    assert seq[0] == ("IN_QUEUE", None), seq
    assert ("COLD_START", "process") in seq and ("COLD_START", "code") in seq, seq
    assert seq.index(("COLD_START", "process")) < seq.index(("COLD_START", "code"))
    assert seq[-1] == ("IN_PROGRESS", None), seq
    worker = events[-2][1]["worker"]
    assert worker and events[-2][1]["hardware"] == "cpu3c-2-4"
    done = events[-1][1]
    assert fj_job.decode(done, name) == 6
    assert done["cold"] is True and done["workerId"] == worker
    phases = done["coldStartPhases"]
    assert set(phases) == {"environment", "process", "code"} and phases["process"] >= 0
    assert done["hardwareLabel"] == "cpu3c-2-4" and done["pricePerSecond"] > 0
    assert done["costColdStart"] > 0
    assert abs(done["costRun"] + done["costColdStart"] - done["cost"]) < 1e-7

    warm = _submit(client, name, 3, progress=False)
    events = _events(warm)
    assert [k for k, _ in events] == ["done"]  # nothing extra without the flag
    done = events[0][1]
    assert done["cold"] is False and done["costColdStart"] == 0
    assert "coldStartPhases" not in done and done["costRun"] == done["cost"]

    view = client.endpoint(name)
    assert view["starts"]["cold"] == 1 and view["starts"]["warm"] == 1
    assert view["starts"]["last_cold_ms"] == view["starts"]["mean_cold_ms"] > 0
    assert view["queue"] == view["health"]["jobs"]["inQueue"] == 0
    r = client.purge_queue(name)
    assert r["removed"] == 0
