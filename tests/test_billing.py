"""Billing: per-second, rounded up, price x gpu_count, kept in the SQLite ledger; and the
GPU/CPU catalogue it prices from."""

from __future__ import annotations

import math
import sqlite3
import time

import pytest
from conftest import use_server, wait_for

from flash_jupyter import ConfigError, Endpoint, catalog
from flash_jupyter import client as fj_client

A100_PRICE = 0.00076


def all_idle(client, name: str) -> bool:
    ws = client.endpoint(name)["workers"]
    return all(w["state"] == "Idle" and w["pid"] is None for w in ws)


def ledger_rows(data_dir) -> list[tuple]:
    db = sqlite3.connect(f"file:{data_dir / 'flash.db'}?mode=ro", uri=True)
    try:
        return db.execute(
            "SELECT endpoint, hardware, emulated, started, stopped, seconds, cost FROM ledger"
        ).fetchall()
    finally:
        db.close()


def test_billed_per_second_rounded_up_and_kept_across_restart(own_server, monkeypatch, name):
    s = own_server()
    client = use_server(s, monkeypatch)
    gpu_name, cpu_name = name + "-gpu", name + "-cpu"

    @Endpoint(name=gpu_name, gpu="A100", gpu_count=2, idle_timeout=1)
    def work(x):
        return x + 1

    @Endpoint(name=cpu_name, cpu="cpu3c-1-2", idle_timeout=1)
    def light(x):
        return x * 2

    t0 = time.monotonic()
    job = work.submit(1)
    assert job.result(timeout=30) == 2
    assert light(4) == 8
    info = job.info()
    assert info["cost"] > 0  # its run and the cold start it waited for (test_scheduler: exact)
    wait_for(lambda: all_idle(client, gpu_name) and all_idle(client, cpu_name), timeout=15,
             what="workers stopped")  # fmt: skip
    wall = time.monotonic() - t0

    bill = client.billing()
    g = bill["endpoints"][gpu_name]
    secs = g["billed_seconds"]
    assert isinstance(secs, int)
    assert 1 <= secs <= wall + 1
    assert g["cost"] == pytest.approx(secs * A100_PRICE * 2, abs=1e-9)
    assert g["price_per_second"] == pytest.approx(A100_PRICE * 2)
    assert g["estimate"] is True  # emulated on CPU: an estimate at list price
    c = bill["endpoints"][cpu_name]
    assert c["billed_seconds"] >= 1
    assert c["cost"] == pytest.approx(c["billed_seconds"] * 0.0000186, abs=1e-9)
    assert c["estimate"] is False
    assert bill["total"] == pytest.approx(sum(e["cost"] for e in bill["endpoints"].values()),
                                          abs=1e-8)  # fmt: skip
    assert bill["estimate"] is True
    assert bill["prices_as_of"] == catalog.PRICES_AS_OF
    assert bill["currency"] == "USD"

    # The ledger: one row per worker lifetime, ceil(stopped - started) seconds.
    rows = [r for r in ledger_rows(s.data_dir) if r[0] == gpu_name]
    assert len(rows) == 1
    _, hardware, emulated, started, stopped, seconds, cost = rows[0]
    assert hardware == "A100 x2 (emulated on CPU)" and emulated == 1
    assert seconds == max(1, math.ceil(stopped - started)) == secs
    assert cost == pytest.approx(seconds * A100_PRICE * 2, abs=1e-12)

    # Restart the control plane on the same data dir: what was billed is still billed.
    before = {k: (v["billed_seconds"], v["cost"]) for k, v in bill["endpoints"].items()}
    fj_client.reset_client()
    s.stop()
    s.start()
    client = use_server(s, monkeypatch)
    after = client.billing()
    assert {k: (v["billed_seconds"], v["cost"]) for k, v in after["endpoints"].items()} == before
    assert after["total"] == pytest.approx(bill["total"], abs=1e-9)


# ---------------------------------------------------------------- the catalogue


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("a100", "A100"),
        ("A100 80GB", "A100"),
        ("H100 PRO", "H100"),
        ("h100", "H100"),
        ("rtx4090", "RTX 4090"),
        ("RTX 4090 PRO", "RTX 4090"),
        ("l40s", "L40S"),
        ("L4", "L4"),
        ("NVIDIA A100-SXM4-80GB", "A100"),  # lookup() says it takes nvidia-smi style names
    ],
)
def test_gpu_aliases_resolve(alias, canonical):
    hw = catalog.lookup(alias, "gpu")
    assert hw.name == canonical and hw.kind == "gpu"


def test_prices_from_the_list():
    assert catalog.lookup("A100").price_per_second == A100_PRICE
    assert catalog.lookup("H100").price_per_second == 0.00116
    assert catalog.lookup("L4").price_per_second == 0.00019
    assert catalog.lookup("cpu", "cpu").kind == "cpu"


def test_unknown_type_lists_known_ones():
    with pytest.raises(ValueError) as ei:
        catalog.lookup("Z9000", "gpu")
    msg = str(ei.value)
    assert "Z9000" in msg
    for known in ("A100", "H100", "RTX 4090", "L40S"):
        assert known in msg
    with pytest.raises(ValueError, match="cpu3c-2-4"):
        catalog.lookup("Z9000", "cpu")
    with pytest.raises(ValueError):
        catalog.lookup("A100", "cpu")  # a GPU is not a CPU type
    with pytest.raises(ConfigError, match="H100"):
        Endpoint(gpu="Z9000")


@pytest.mark.parametrize(
    "smi, canonical",
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA RTX A6000", "RTX A6000"),
        ("NVIDIA A40", "A40"),
        ("NVIDIA RTX A4000", "RTX A4000"),
        ("NVIDIA H200", "H200"),
    ],
)
def test_match_smi_name(smi, canonical):
    hw = catalog.match_smi_name(smi)
    assert hw is not None and hw.name == canonical


def test_match_smi_name_unknown():
    assert catalog.match_smi_name("Tesla T4") is None
    assert catalog.match_smi_name("NVIDIA A400") is None
