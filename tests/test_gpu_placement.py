"""GPU placement on a host with NVIDIA GPUs, without one: `nvidia-smi` is the only thing
faked (a script on PATH printing what the real one prints for this host); the control plane,
the provider and the workers are the real ones."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import use_server, wait_for

from flash_jupyter import ControlPlaneError, Endpoint

SMI = """#!/bin/sh
# Answers `nvidia-smi --query-gpu=index,name --format=csv,noheader` for a 2-GPU host.
echo "0, NVIDIA A100-SXM4-80GB"
echo "1, NVIDIA H100 80GB HBM3"
"""


@pytest.fixture
def gpu_host(own_server, monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(SMI)
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)

    def make(**env: str):
        server = own_server(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
        return server, use_server(server, monkeypatch)

    return make


def visible():
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_each_worker_gets_the_gpu_it_asked_for(gpu_host):
    _, client = gpu_host()
    h100 = Endpoint(name="on-h100", gpu="H100", idle_timeout=5)(visible)
    a100 = Endpoint(name="on-a100", gpu="A100", idle_timeout=5)(visible)
    assert a100() == "0"
    assert h100() == "1"
    workers = {w["hardware"] for ep in client.endpoints() for w in ep["workers"] if w["pid"]}
    assert workers == {"A100", "H100"}  # real devices: not labelled emulated
    b = client.billing()["endpoints"]
    assert b["on-a100"]["estimate"] is False and b["on-h100"]["estimate"] is False


def test_a_busy_gpu_throttles_the_next_worker(gpu_host):
    _, client = gpu_host()

    @Endpoint(name="holder", gpu="A100", idle_timeout=1)
    def hold(t):
        import os
        import time

        time.sleep(t)
        return os.environ["CUDA_VISIBLE_DEVICES"]

    waiter = Endpoint(name="waiter", gpu="A100", idle_timeout=1)(visible)
    first = hold.submit(3)
    wait_for(lambda: client.health("holder")["workers"]["running"] == 1, what="holder runs")
    second = waiter.submit()

    def throttled():
        return any(w["state"] == "Throttled" for w in client.endpoint("waiter")["workers"])

    wait_for(throttled, what="the second A100 worker is Throttled")
    assert first.result(timeout=30) == "0"
    assert second.result(timeout=30) == "0"  # it got the same device once it was free


def test_a_list_of_types_takes_a_free_one_and_prices_it(gpu_host):
    _, client = gpu_host()
    either = Endpoint(name="either", gpu=["H100", "A100"], idle_timeout=5)(visible)
    assert either() == "1"  # the first acceptable type that is free
    [w] = [w for w in client.endpoint("either")["workers"] if w["pid"]]
    assert w["hardware"] == "H100" and w["price_per_second"] == pytest.approx(0.00116)


def test_strict_mode_refuses_what_the_host_lacks(gpu_host):
    gpu_host(FLASH_JUPYTER_STRICT_GPU="1")
    with pytest.raises(ControlPlaneError, match="L4"):
        Endpoint(name="needs-l4", gpu="L4")(visible)()
    # What the host has is placed as usual.
    assert Endpoint(name="has-h100", gpu="H100", idle_timeout=5)(visible)() == "1"
