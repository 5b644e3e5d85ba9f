"""``EventFeed``: the process's one live subscription to ``/v1/events`` and the model it keeps,
against a real control plane (workers are real processes)."""

from __future__ import annotations

import threading

import pytest
from conftest import use_server, wait_for

from flash_jupyter import Endpoint
from flash_jupyter.event_feed import EventFeed, get_feed


class Recorder:
    """A listener keeping every event it is called with."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, ev: dict) -> None:
        with self.lock:
            self.events.append(ev)

    def of(self, kind: str) -> list[dict]:
        with self.lock:
            return [e for e in self.events if e.get("type") == kind]


@pytest.fixture
def feed():
    f = EventFeed(linger=0.1)
    yield f
    f.stop()


def worker_states(rec: Recorder, name: str) -> list[str]:
    return [e["state"] for e in rec.of("worker") if e.get("endpoint") == name]


def test_feed_sees_a_worker_start_and_run_a_call(client, server, feed, name):
    @Endpoint(name=name, workers=(0, 1), idle_timeout=30)
    def double(x):
        return 2 * x

    double.deploy()
    rec = Recorder()
    feed.add_listener(rec)
    assert feed.wait_synced(15), feed.message
    assert feed.connected and name in feed.endpoints
    assert feed.endpoints[name]["workers"] == [] or all(
        w["state"] == "Idle" for w in feed.endpoints[name]["workers"]
    )

    assert double(21) == 42
    wait_for(lambda: "Running" in worker_states(rec, name), what="a Running worker event")
    states = worker_states(rec, name)
    assert "Initializing" in states, states
    assert states.index("Initializing") < states.index("Running"), states
    # The model holds the worker as the events told it ...
    wait_for(
        lambda: any(w["state"] == "Running" for w in feed.endpoints[name]["workers"]),
        what="the model's worker to be Running",
    )
    # ... and the job events had the endpoint's view fetched again (its counts moved).
    wait_for(
        lambda: feed.endpoints[name]["health"]["jobs"]["completed"] >= 1,
        what="the refetched view to count the completed job",
    )
    assert any(e.get("name") == name for e in rec.of("view"))
    w = next(w for w in feed.endpoints[name]["workers"] if w["state"] == "Running")
    assert isinstance(w["_at"], float)  # when it arrived: countdowns run from there


def test_feed_sees_endpoints_made_and_deleted_over_http(server, feed, name, monkeypatch):
    use_server(server, monkeypatch)
    rec = Recorder()
    feed.add_listener(rec)
    assert feed.wait_synced(15), feed.message
    assert name not in feed.endpoints
    with server.http() as api:
        r = api.put(f"/v1/endpoints/{name}", json={"gpu": "L4", "workers": [0, 2]})
        assert r.status_code == 200, r.text
        view = wait_for(lambda: feed.endpoints.get(name), what="the endpoint made over HTTP")
        assert view["hardware"] == "L4"
        assert (view["config"]["workers_min"], view["config"]["workers_max"]) == (0, 2)
        assert api.delete(f"/v1/endpoints/{name}").status_code == 200
    wait_for(lambda: name not in feed.endpoints, what="the deleted endpoint to leave the model")
    assert any(e.get("action") == "deleted" and e.get("name") == name for e in rec.of("endpoint"))


def test_feed_stops_when_its_last_listener_leaves(server, feed, monkeypatch):
    use_server(server, monkeypatch)
    rec = Recorder()
    feed.add_listener(rec)
    assert feed.wait_synced(15), feed.message
    assert feed.running
    feed.remove_listener(rec)
    wait_for(lambda: not feed.running, what="the feed to stop after its linger")
    assert not feed.connected
    # A new listener subscribes again, from a fresh snapshot.
    feed.add_listener(rec)
    assert feed.wait_synced(15), feed.message
    assert len(rec.of("connection")) >= 2


def test_feed_survives_a_control_plane_restart(own_server, monkeypatch, name):
    s = own_server()
    use_server(s, monkeypatch)
    feed = EventFeed(linger=0.1)
    try:
        rec = Recorder()
        feed.add_listener(rec)
        assert feed.wait_synced(15), feed.message
        s.stop()
        wait_for(lambda: not feed.connected, what="the feed to notice the control plane went")
        down = [e for e in rec.of("connection") if not e["connected"]]
        assert down and down[-1]["message"], down
        s.start()
        assert feed.wait_synced(30), feed.message
        with s.http() as api:
            r = api.put(f"/v1/endpoints/{name}", json={"cpu": "cpu3c-2-4"})
            assert r.status_code == 200, r.text
        wait_for(lambda: name in feed.endpoints, what="an endpoint made after the restart")
    finally:
        feed.stop()


def test_get_feed_is_one_per_process():
    assert get_feed() is get_feed()
