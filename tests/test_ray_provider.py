"""The Ray provider on Ray's own multi-node test cluster (``ray.cluster_utils.Cluster``: several
raylets on this machine) with fake GPU counts and accelerator-type resources. The control plane
(``serve`` with ``FLASH_JUPYTER_PROVIDER=ray``), its actors and the workers are the real ones;
the GPUs are not: ``CUDA_VISIBLE_DEVICES`` as Ray sets it is what isolation means here.

One cluster and one control plane for the module (starting them takes most of its time).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from conftest import Server, make_server, use_server, wait_for

ray = pytest.importorskip("ray", reason="the Ray provider's tests need Ray (pip install ray)")
from ray.cluster_utils import Cluster  # noqa: E402

from flash_jupyter import Endpoint  # noqa: E402
from flash_jupyter import client as fj_client  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, dict[str, str]]]:
    """A head that runs nothing, a CPU node, an A100 node (2 GPUs), an L4 node (1 GPU)."""
    started = time.monotonic()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {
        "cpu": c.add_node(num_cpus=4),
        "A100": c.add_node(num_cpus=2, num_gpus=2, resources={"accelerator_type:A100": 1}),
        "L4": c.add_node(num_cpus=2, num_gpus=1, resources={"accelerator_type:L4": 1}),
    }
    c.wait_for_nodes()
    print(f"\nray test cluster up in {time.monotonic() - started:.1f} s")
    try:
        yield c, {k: n.node_id for k, n in nodes.items()}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def ray_server(cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    c, _ = cluster
    started = time.monotonic()
    s = make_server(
        tmp_path_factory.mktemp("cp-ray"), FLASH_JUPYTER_PROVIDER="ray", RAY_ADDRESS=c.address
    ).start(timeout=90)
    print(f"control plane on Ray up in {time.monotonic() - started:.1f} s")
    yield s
    s.stop()


@pytest.fixture
def rc(ray_server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[fj_client.Client]:
    c = use_server(ray_server, monkeypatch)
    yield c
    fj_client.reset_client()


def provider(c: fj_client.Client) -> dict:
    return c._call("GET", "/v1/info")["provider"]


def placed(c: fj_client.Client, worker_id: str) -> dict | None:
    for w in provider(c)["workers"]:
        if w["worker"] == worker_id and w["state"] == "placed":
            return w
    return None


def where():
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()


def running(c: fj_client.Client, name: str) -> list[dict]:
    return [w for w in c.endpoint(name)["workers"] if w["state"] == "Running"]


def test_workers_land_on_the_node_with_their_gpu_type(rc, cluster, name):
    _, nodes = cluster
    two = Endpoint(name=f"{name}-a100", gpu="A100", gpu_count=2, idle_timeout=30)(where)
    listed = Endpoint(name=f"{name}-list", gpu=["H100", "L4"], idle_timeout=30)(where)
    cpu = Endpoint(name=f"{name}-cpu", idle_timeout=30)(where)

    devices, _ = two()
    [w] = running(rc, f"{name}-a100")
    info = placed(rc, w["id"])
    assert info["node_id"] == nodes["A100"], info
    assert sorted(devices.split(",")) == ["0", "1"], devices  # Ray's two GPUs, both visible
    # No NVIDIA driver on this machine: the type Ray placed it on, marked emulated.
    assert w["hardware"] == "A100 x2 (emulated on CPU)" and w["emulated"] is True, w

    devices, _ = listed()  # no node has an H100: the next type in the list
    [w] = running(rc, f"{name}-list")
    assert placed(rc, w["id"])["node_id"] == nodes["L4"]
    assert devices == "0" and w["hardware"].startswith("L4"), w

    devices, _ = cpu()
    [w] = running(rc, f"{name}-cpu")
    info = placed(rc, w["id"])
    assert info["node_id"] == nodes["cpu"], info
    assert devices in (None, ""), devices  # a CPU worker sees no GPU
    assert info["resources"] == {"CPU": 2.0, "memory": float(4 << 30)}, info  # cpu3c-2-4

    for n in ("a100", "list", "cpu"):
        rc.stop(f"{name}-{n}")


def test_a_type_no_node_has_is_throttled_until_a_node_joins(rc, cluster, name):
    c, _ = cluster
    h100 = Endpoint(name=name, gpu="H100", idle_timeout=30)(where)
    job = h100.submit()

    def throttled():
        ws = rc.endpoint(name)["workers"]
        return any(w["state"] == "Throttled" for w in ws)

    wait_for(throttled, what="the H100 worker to be Throttled")
    assert "H100" in provider(rc)["waiting"][name]
    assert rc.billing()["endpoints"].get(name, {}).get("cost", 0) == 0  # Throttled: unbilled
    assert job.status() == "IN_QUEUE"
    node = c.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1})
    devices, _ = job.result(timeout=60)
    assert devices == "0"
    [w] = running(rc, name)
    assert placed(rc, w["id"])["node_id"] == node.node_id
    rc.stop(name)


def test_killing_the_actor_mid_job_retries_the_job(rc, cluster, name, tmp_path):
    c, _ = cluster
    marker = tmp_path / "first-run"

    @Endpoint(name=name, gpu="L4", idle_timeout=30)
    def slow(path: str) -> str:
        import os
        import time

        if not os.path.exists(path):
            open(path, "w").close()
            time.sleep(60)  # the first run never ends: its actor is killed
        return "done"

    job = slow.submit(str(marker))
    wait_for(marker.exists, timeout=60, what="the first run to start")
    [w] = running(rc, name)
    actor = placed(rc, w["id"])["actor"]
    if not ray.is_initialized():
        ray.init(address=c.address, log_to_driver=False)
    ray.kill(ray.get_actor(actor, namespace="flash-jupyter"), no_restart=True)
    assert job.result(timeout=60) == "done"
    info = job.info()
    assert info.get("retries") == 1, info
    ws = rc.endpoint(name)["workers"]
    reasons = " ".join(w.get("reason") or "" for w in ws)
    assert "ray.kill" in reasons or any(w["incarnation"] >= 2 for w in ws), ws
    rc.stop(name)


def test_idle_workers_scale_to_zero_and_free_the_node(rc, name):
    f = Endpoint(name=name, gpu="A100", idle_timeout=1)(where)
    f()
    [w] = running(rc, name)
    wid = w["id"]
    wait_for(lambda: all(x["state"] == "Idle" for x in rc.endpoint(name)["workers"]),
             timeout=30, what="the idle worker to stop")  # fmt: skip
    wait_for(lambda: all(x["worker"] != wid for x in provider(rc)["workers"]), timeout=30,
             what="the actor to be gone")  # fmt: skip
    b = rc.billing()["endpoints"][name]
    assert b["billed_seconds"] >= 1, b  # billed until the actor stopped


def test_a_flash_cell_keeps_state_through_the_ray_provider(ray_server, name, tmp_path):
    from notebook_kernel import start_kernel

    k = start_kernel(ray_server, tmp_path)
    try:
        k.ok(f"%%flash name={name} workers=0,1 --keep m\nimport os\nm = {{'w': 3}}")
        assert k.value("type(m).__name__") == "'RemoteValue'"
        r = k.run(f"%%flash name={name}\nm['w'] * 2").ok()
        assert r.value["text/plain"] == "6"
        assert k.value("m.fetch()") == "{'w': 3}"
    finally:
        k.shutdown()
        with ray_server.http() as h:
            h.post(f"/v1/endpoints/{name}/stop")


def test_dependencies_are_built_on_the_node(rc, name, tmp_path):
    from test_dependencies import make_wheel

    wheel = make_wheel(tmp_path)  # a local wheel: pip needs no network

    @Endpoint(name=name, dependencies=[str(wheel)], idle_timeout=30)
    def value():
        import fjtinypkg

        return fjtinypkg.VALUE

    job = value.submit()
    assert job.result(timeout=180) == 42
    info = job.info()
    phases = info.get("coldStartPhases") or {}
    assert "environment" in phases and phases["environment"] > 0, info  # built on the node
    assert info.get("environment") == "installed at request time", info
    rc.stop(name)


def test_ray_is_not_imported_by_the_local_control_plane():
    import subprocess
    import sys

    code = (
        "import sys, flash_jupyter.server.app, flash_jupyter.providers.local, "
        "flash_jupyter.server.control; print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ}, check=True).stdout  # fmt: skip
    assert out.strip() == "False"


# ---------------------------------------------------------------- autoscaling, pending, strict


def autoscaler_request(c: Cluster) -> list[dict]:
    """The resource request Ray's autoscaler holds now (``request_resources``), as bundles."""
    if not ray.is_initialized():
        ray.init(address=c.address, log_to_driver=False)
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2(fetch_from_server=True):
        from ray._private.worker import global_worker
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        state = get_cluster_resource_state(global_worker.gcs_client)
        out = []
        for constraint in state.cluster_resource_constraints:
            for req in constraint.resource_requests:
                out += [dict(req.request.resources_bundle)] * req.count
        return out
    import json

    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def test_a_throttled_worker_asks_the_autoscaler_for_a_node(rc, cluster, name):
    c, _ = cluster
    job = Endpoint(name=name, gpu="H200", gpu_count=2, idle_timeout=30)(where).submit()
    want = {"CPU": 1.0, "GPU": 2.0, "accelerator_type:H200": 0.001}

    def asked() -> bool:
        return want in autoscaler_request(c)

    wait_for(asked, timeout=30, what="an autoscaler request for two H200s")
    assert want in provider(rc)["autoscaler_request"]
    assert [w["state"] for w in rc.endpoint(name)["workers"]] == ["Throttled"]
    job.cancel()
    rc.stop(name)
    wait_for(lambda: autoscaler_request(c) == [], timeout=30,
             what="the request cleared once nothing waits")  # fmt: skip
    assert provider(rc)["autoscaler_request"] == []


@pytest.fixture
def stale_server(cluster, tmp_path) -> Iterator[Server]:
    """A control plane that reads the cluster's free resources once, at start: what it
    believes free may have been taken since."""
    c, _ = cluster
    s = make_server(tmp_path / "cp", FLASH_JUPYTER_PROVIDER="ray", RAY_ADDRESS=c.address,
                    FLASH_JUPYTER_RAY_POLL="3600").start(timeout=90)  # fmt: skip
    yield s
    s.stop()


def test_a_placement_taken_by_another_user_waits_throttled_unbilled(
    stale_server, cluster, name, monkeypatch
):
    from ray.util.placement_group import placement_group, remove_placement_group

    c, nodes = cluster
    rc = use_server(stale_server, monkeypatch)
    if not ray.is_initialized():
        ray.init(address=c.address, log_to_driver=False)
    # Another user of the cluster takes the L4 after the control plane looked.
    theirs = placement_group([{"GPU": 1, "accelerator_type:L4": 0.001}])
    ray.get(theirs.ready(), timeout=60)
    try:
        job = Endpoint(name=name, gpu="L4", idle_timeout=30)(where).submit()

        def pending() -> bool:
            return any(w["state"] == "Throttled" and "grant" in (w.get("reason") or "")
                       for w in rc.endpoint(name)["workers"])  # fmt: skip

        wait_for(pending, timeout=60, what="the L4 worker to wait for its placement")
        assert rc.billing()["endpoints"].get(name, {}).get("cost", 0) == 0
        assert job.status() == "IN_QUEUE"
    finally:
        remove_placement_group(theirs)
    devices, _ = job.result(timeout=60)  # granted once they let go
    assert devices == "0"
    [w] = running(rc, name)
    assert placed(rc, w["id"])["node_id"] == nodes["L4"]
    rc.stop(name)
    fj_client.reset_client()


def test_strict_mode_refuses_a_type_no_node_has_and_never_emulates(cluster, tmp_path, name,
                                                                    monkeypatch):  # fmt: skip
    from flash_jupyter.errors import FlashError

    c, _ = cluster
    s = make_server(tmp_path / "cp", FLASH_JUPYTER_PROVIDER="ray", RAY_ADDRESS=c.address,
                    FLASH_JUPYTER_STRICT_GPU="1").start(timeout=90)  # fmt: skip
    try:
        rc = use_server(s, monkeypatch)
        with pytest.raises(FlashError, match="H200") as e:
            Endpoint(name=f"{name}-h200", gpu="H200", idle_timeout=30)(where).submit()
        assert "A100" in str(e.value) and "STRICT_GPU" in str(e.value)
        assert f"{name}-h200" not in [v["name"] for v in rc.endpoints()]  # nothing recorded
        # The A100 node has GPU resources but no driver names them: not run emulated.
        job = Endpoint(name=f"{name}-a100", gpu="A100", idle_timeout=30)(where).submit()

        def refused() -> bool:
            ws = rc.endpoint(f"{name}-a100")["workers"]
            return any("no NVIDIA driver" in (w.get("reason") or "") for w in ws)

        wait_for(refused, timeout=60, what="the emulated start refused")
        assert job.status() in ("IN_QUEUE", "FAILED")
        rc.stop(f"{name}-a100")
    finally:
        fj_client.reset_client()
        s.stop()


def big_echo(data):
    return data.nbytes, data[::-1].copy()


def test_a_worker_that_does_not_share_the_spool_gets_buffers_inline(ray_server, rc, name):
    """As on another machine (or a pod with its own /dev/shm): the actor cannot read the
    marker the control plane left in its spool, so the worker gets no spool; 4 MiB each way
    must travel inline (a worker without the spool refuses a spool file)."""
    import pathlib

    Endpoint(name=f"{name}-warm", idle_timeout=30)(where)()  # the marker exists once a worker has
    rc.stop(f"{name}-warm")
    marker = pathlib.Path(rc._call("GET", "/v1/info")["spool"]) / ".flash-host"
    nonce = marker.read_text()
    marker.unlink()
    try:
        import numpy as np

        data = np.random.default_rng(0).integers(0, 255, 4 << 20, dtype=np.uint8)
        n, back = Endpoint(name=name, idle_timeout=30)(big_echo)(data)  # spooled on this host
        assert n == data.nbytes and (back == data[::-1]).all()
        [w] = running(rc, name)
        assert placed(rc, w["id"])["same_host"] is False
    finally:
        marker.write_text(nonce)
        rc.stop(name)
