"""Runpod serverless worker files, deployed unchanged with ``flash-jupyter deploy`` (the real
CLI, a subprocess) and called over HTTP ``/v2`` (httpx), on real workers that run them with
the real ``runpod`` package.

Each file below is what a Runpod user has: it imports runpod, defines a handler taking the job
``{"id", "input"}``, and calls ``runpod.serverless.start({...})``. Handlers that must be seen
*while* they run wait for a file the test creates (a deadline bounds each wait)."""

from __future__ import annotations

import itertools
import json
import secrets
import textwrap
from pathlib import Path

import httpx
import pytest
from conftest import Server, poll, wait_for
from test_deploy import assert_only_workers_imported, cli, runsync

from flash_jupyter.app.discover import discover, parse_overrides

# A handler's wait for the test's "go" file: polled, bounded (the test fails, never hangs).
WAIT_GO = """
def wait_go(path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError("the test never said go")
        time.sleep(0.01)
"""

FILES = {
    # A plain handler, started under `if __name__ == "__main__":` as most Runpod files are.
    "plain": """
import os
import sys

import runpod

with open({marker!r}, "a") as f:
    f.write(f"{{os.getpid()}} {{'flash_jupyter.worker.main' in sys.modules}}\\n")


def handler(job):
    job_input = job["input"]
    if job_input.get("fail"):
        raise ValueError("no good: " + job_input["fail"])
    if job_input.get("soft"):
        return {{"error": "soft failure", "detail": 1}}
    return {{"id": job["id"], "sum": job_input["a"] + job_input.get("b", 0), "main": __name__}}


if __name__ == "__main__":
    runpod.serverless.start({{"handler": handler}})
""",
    # A generator whose chunks are also the output (return_aggregate_stream).
    "agg": """
import os
import time

import runpod
{wait_go}

def handler(job):
    yield {{"tok": "a"}}
    if job["input"].get("boom"):
        raise RuntimeError("boom after a")
    wait_go(job["input"]["go"])
    yield {{"tok": "b"}}


runpod.serverless.start({{"handler": handler, "return_aggregate_stream": True}})
""",
    # An async generator without return_aggregate_stream: streamed, output [] (as Runpod).
    "stream": """
import asyncio
import os
import time

from runpod.serverless import start


async def handler(job):
    yield "first"
    deadline = time.monotonic() + 60
    try:
        while not os.path.exists(job["input"]["go"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    except asyncio.CancelledError:  # a cancel reaches the handler as on Runpod
        open(job["input"]["go"] + ".cancelled", "w").close()
        raise
    yield "second"


start({{"handler": handler}})
""",
    # An async handler.
    "asyncfn": """
import asyncio

import runpod as rp


async def handler(job):
    await asyncio.sleep(0)
    return {{"twice": job["input"]["x"] * 2}}


rp.serverless.start({{"handler": handler}})
""",
    # Runpod's concurrent handler: two jobs must be inside it at the same time to finish.
    "conc": """
import asyncio
import time

import runpod

inside = set()


async def handler(job):
    inside.add(job["id"])
    print("in", job["id"])
    deadline = time.monotonic() + 30
    while len(inside) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return {{"together": len(inside) >= 2}}


def adjust_concurrency(current_concurrency):
    return 2


runpod.serverless.start({{"handler": handler, "concurrency_modifier": adjust_concurrency}})
""",
    # progress_update while the job runs.
    "progress": """
import os
import time

import runpod
{wait_go}

def handler(job):
    runpod.serverless.progress_update(job, "step 1/2")
    wait_go(job["input"]["go"])
    return "done"


runpod.serverless.start({{"handler": handler}})
""",
}


@pytest.fixture(scope="module")
def deployed(server: Server, tmp_path_factory: pytest.TempPathFactory):
    """FILES in one folder, deployed with one `flash-jupyter deploy FOLDER`: endpoint names
    are the file names (``rpXXXX_plain``...)."""
    folder = tmp_path_factory.mktemp("runpod-files")
    prefix = f"rp{secrets.token_hex(2)}"
    marker = folder.parent / f"{prefix}-imported-by.txt"
    names = {}
    for key, text in FILES.items():
        name = f"{prefix}_{key}"
        (folder / f"{name}.py").write_text(text.format(marker=str(marker), wait_go=WAIT_GO))
        names[key] = name
    r = cli(server, "deploy", str(folder))
    ran = marker.exists()  # the CLI reads the files; only workers run them
    yield {"names": names, "out": r.stdout, "marker": marker, "ran_at_deploy": ran}
    with server.http() as h:
        for n in names.values():
            h.delete(f"/v1/endpoints/{n}")


@pytest.fixture
def h(server: Server):
    with server.http() as client:
        yield client


def run(h: httpx.Client, name: str, inp: dict) -> str:
    r = h.post(f"/v2/{name}/run", json={"input": inp})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def status(h: httpx.Client, name: str, jid: str) -> dict:
    r = h.get(f"/v2/{name}/status/{jid}")
    assert r.status_code == 200, r.text
    return r.json()


def streamed(h: httpx.Client, name: str, jid: str) -> list:
    """The chunks a /stream call hands out (the ones not handed out before, or all so far:
    either way a chunk shows up in some call once it exists)."""
    r = h.get(f"/v2/{name}/stream/{jid}")
    assert r.status_code == 200, r.text
    return [c["output"] for c in r.json().get("stream", [])]


def test_deploy_finds_runpod_files_and_runs_a_plain_handler(deployed, h):
    names, out = deployed["names"], deployed["out"]
    lines = {ln.split()[0]: ln.split()[1:3] for ln in out.splitlines() if len(ln.split()) > 3}
    assert all(lines.get(n) == ["created", "runpod"] for n in names.values()), out
    assert not deployed["ran_at_deploy"], "deploy ran the Runpod file"
    # the curl line's example input: the keys the handler reads from job["input"]
    runsync_url = f"/v2/{names['plain']}/runsync"
    curl = next(ln for ln in out.splitlines() if runsync_url in ln and "curl" in ln)
    assert '"a": 1' in curl and '"b": 0' in curl, curl
    body = runsync(h, names["plain"], {"a": 2, "b": 3})
    assert body["status"] == "COMPLETED", body
    # the handler got the job's own id, and ran as __main__ (as `python handler.py` does)
    assert body["output"] == {"id": body["id"], "sum": 5, "main": "__main__"}, body
    assert_only_workers_imported(deployed["marker"])


def test_a_failing_handler_reports_runpods_error(deployed, h):
    name = deployed["names"]["plain"]
    body = runsync(h, name, {"fail": "x"})
    assert body["status"] == "FAILED", body
    err = json.loads(body["error"])  # a JSON string, as Runpod's worker reports it
    assert "ValueError" in err["error_type"], err
    assert err["error_message"] == "no good: x", err
    assert 'raise ValueError("no good: " + job_input["fail"])' in err["error_traceback"], err
    assert err["worker_id"].startswith(name), err
    # a handler that returns {"error": ...} fails the job too (Runpod's run_job)
    soft = runsync(h, name, {"soft": 1})
    assert soft["status"] == "FAILED" and "soft failure" in soft["error"], soft


def test_generator_streams_while_running_and_aggregates(deployed, h, tmp_path):
    name = deployed["names"]["agg"]
    go = tmp_path / "go-agg"
    jid = run(h, name, {"go": str(go)})
    wait_for(lambda: {"tok": "a"} in streamed(h, name, jid), timeout=60, what="the first chunk")
    assert status(h, name, jid)["status"] == "IN_PROGRESS"  # it waits for go: still running
    go.touch()
    done = poll(h, name, jid)
    assert done["status"] == "COMPLETED", done
    assert done["output"] == [{"tok": "a"}, {"tok": "b"}], done  # return_aggregate_stream


def test_a_generator_that_raises_fails_the_job_after_its_chunks(deployed, h):
    name = deployed["names"]["agg"]
    body = runsync(h, name, {"boom": 1})
    assert body["status"] == "FAILED", body
    err = json.loads(body["error"])
    assert "RuntimeError" in err["error_type"] and err["error_message"] == "boom after a", err
    assert 'raise RuntimeError("boom after a")' in err["error_traceback"], err
    r = h.get(f"/v2/{name}/stream/{body['id']}", params={"all": 1})
    assert [c["output"] for c in r.json()["stream"]] == [{"tok": "a"}], r.text


def test_async_generator_without_aggregate_streams_and_outputs_nothing(deployed, h, tmp_path):
    name = deployed["names"]["stream"]
    go = tmp_path / "go-stream"
    jid = run(h, name, {"go": str(go)})
    wait_for(lambda: "first" in streamed(h, name, jid), timeout=60, what="the first chunk")
    assert status(h, name, jid)["status"] == "IN_PROGRESS"
    go.touch()
    done = poll(h, name, jid)
    assert done["status"] == "COMPLETED" and done["output"] == [], done
    r = h.get(f"/v2/{name}/stream/{jid}", params={"all": 1})
    assert [c["output"] for c in r.json()["stream"]] == ["first", "second"], r.text


def test_cancel_stops_an_async_handler_and_keeps_its_worker(deployed, h, tmp_path):
    name = deployed["names"]["stream"]
    jid = run(h, name, {"go": str(tmp_path / "never")})
    wait_for(lambda: "first" in streamed(h, name, jid), timeout=60, what="the first chunk")
    first = status(h, name, jid)
    assert h.post(f"/v2/{name}/cancel/{jid}").status_code == 200
    assert poll(h, name, jid)["status"] == "CANCELLED"
    wait_for((tmp_path / "never.cancelled").exists, timeout=30, what="the task's cancel")
    go = tmp_path / "go"
    go.touch()
    after = poll(h, name, run(h, name, {"go": str(go)}))
    assert after["status"] == "COMPLETED", after
    # the task was cancelled on the worker: the same process took the next job (a handler
    # that ignored the cancel would have had its worker replaced)
    assert (after["workerId"], after["workerIncarnation"]) == (
        first["workerId"], first["workerIncarnation"]
    ), (first, after)  # fmt: skip


def test_async_handler(deployed, h):
    body = runsync(h, deployed["names"]["asyncfn"], {"x": 21})
    assert body["status"] == "COMPLETED" and body["output"] == {"twice": 42}, body


def test_concurrency_modifier_lets_two_jobs_run_at_once(deployed, h):
    name = deployed["names"]["conc"]
    view = h.get(f"/v1/endpoints/{name}").json()
    assert view["config"]["max_concurrency"] == 2, view["config"]
    assert view["config"]["workers_max"] == 1  # one worker: both jobs on it
    jids = [run(h, name, {"k": i}) for i in range(2)]
    outs = [poll(h, name, j) for j in jids]
    assert [o["status"] for o in outs] == ["COMPLETED"] * 2, outs
    assert [o["output"] for o in outs] == [{"together": True}] * 2, outs
    assert outs[0]["workerId"] == outs[1]["workerId"], outs
    # each job's prints (from the worker's one event loop) are that job's output in the logs

    def printed():
        logs = h.get(f"/v1/endpoints/{name}/logs").json()
        return {e["job"] for e in logs if e["text"] == f"in {e['job']}\n"} == set(jids)

    wait_for(printed, what="each job's print in the logs, as that job's")


def test_progress_update_is_the_running_jobs_output(deployed, h, tmp_path):
    name = deployed["names"]["progress"]
    go = tmp_path / "go-progress"
    jid = run(h, name, {"go": str(go)})
    s = wait_for(lambda: (p := status(h, name, jid)).get("output") == "step 1/2" and p,
                 timeout=60, what="the progress update")  # fmt: skip
    assert s["status"] == "IN_PROGRESS", s
    jobs = h.get("/v1/jobs", params={"endpoint": name}).json()  # the job view shows it too
    assert [j.get("output") for j in jobs if j["id"] == jid] == ["step 1/2"], jobs
    go.touch()
    done = poll(h, name, jid)
    assert done["status"] == "COMPLETED" and done["output"] == "done", done


def test_runpod_client_calls_a_deployed_worker_file(deployed, server, monkeypatch, tmp_path):
    runpod = pytest.importorskip("runpod")
    monkeypatch.setattr(runpod, "api_key", server.token)
    monkeypatch.setattr(runpod, "endpoint_url_base", server.url + "/v2")
    out = runpod.Endpoint(deployed["names"]["plain"]).run_sync({"a": 40, "b": 2}, timeout=60)
    assert out["sum"] == 42, out
    go = tmp_path / "go"
    go.touch()
    job = runpod.Endpoint(deployed["names"]["agg"]).run({"go": str(go)})
    chunks = list(itertools.islice(job.stream(), 4))  # bounded: a stream that repeats fails
    assert chunks == [{"tok": "a"}, {"tok": "b"}], chunks
    assert job.output(timeout=60) == chunks


def test_the_example_worker_file(server, h):
    example = Path(__file__).resolve().parents[1] / "examples" / "runpod_handler.py"
    name = f"rp{secrets.token_hex(2)}-example"
    out = cli(server, "deploy", str(example), "--set", f"runpod_handler.name={name}").stdout
    try:
        assert '"text": "hello world", "delay": 0.0' in out, out
        view = h.get(f"/v1/endpoints/{name}").json()
        assert view["config"]["max_concurrency"] == 4, view
        body = runsync(h, name, {"text": "to be or not"})
        assert body["status"] == "COMPLETED", body
        assert [c["word"] for c in body["output"]] == ["to", "be", "or", "not"], body
    finally:
        h.delete(f"/v1/endpoints/{name}")


def test_requirements_txt_beside_the_file_is_its_environment(own_server, tmp_path):
    from test_dependencies import make_wheel

    wheel = make_wheel(tmp_path)
    offline = {"PIP_NO_INDEX": "1", "UV_OFFLINE": "1"}  # no network: the wheel alone
    s = own_server(**offline)
    proj = tmp_path / "worker"
    proj.mkdir()
    (proj / "requirements.txt").write_text(
        f"# the worker's own packages\nrunpod>=1.7\n{wheel}\n--extra-index-url https://x.invalid\n"
    )
    (proj / "handler.py").write_text(
        textwrap.dedent("""
        import fjtinypkg
        import runpod


        def handler(job):
            return fjtinypkg.VALUE + job["input"]["plus"]


        runpod.serverless.start({"handler": handler})
    """)
    )
    r = cli(s, "deploy", str(proj / "handler.py"),
            env={**offline, "FLASH_JUPYTER_HOME": str(s.data_dir)})  # fmt: skip
    assert "handler: environment" in r.stdout, r.stdout  # built before the deploy
    assert "--extra-index-url" in r.stdout and "left out" in r.stdout, r.stdout
    with s.http() as h:
        body = runsync(h, "handler", {"plus": 1})
        assert body["status"] == "COMPLETED" and body["output"] == 43, body
        assert body["environment"] == "pre-installed", body


# ---------------------------------------------------------------- reading files (no server)
def write(tmp_path: Path, text: str, name: str = "worker.py") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("imports, call", [
    ("import runpod", "runpod.serverless.start"),
    ("import runpod as rp", "rp.serverless.start"),
    ("import runpod.serverless", "runpod.serverless.start"),
    ("import runpod.serverless as rs", "rs.start"),
    ("from runpod import serverless", "serverless.start"),
    ("from runpod.serverless import start as go", "go"),
])  # fmt: skip
def test_start_is_found_under_every_import_spelling(tmp_path, imports, call):
    f = write(
        tmp_path,
        f"""
        {imports}

        def handler(job):
            return job["input"]

        config = {{"handler": handler}}
        config["return_aggregate_stream"] = True
        {call}(config)
    """,
    )
    d = discover(f)
    assert not d.problems, d.problems
    [e] = d.endpoints
    assert (e.name, e.kind, e.qualname) == ("worker", "runpod", "handler")
    assert e.config.max_concurrency == 1  # no concurrency_modifier: one job at a time


def test_a_file_is_runpods_when_it_calls_start_and_has_no_endpoint(tmp_path):
    text = """
        import runpod

        def handler(job):
            return 1
    """
    assert discover(write(tmp_path, text)).endpoints == []
    started = text.rstrip() + '\n\n        runpod.serverless.start({"handler": handler})\n'
    assert [(e.name, e.kind) for e in discover(write(tmp_path, started)).endpoints] == [
        ("worker", "runpod")
    ]
    g = write(tmp_path, """
        import runpod
        from flash_jupyter import Endpoint

        @Endpoint(name="mine")
        def handler(x):
            return x

        runpod.serverless.start({"handler": handler})
    """, "both.py")  # fmt: skip
    assert [(e.name, e.kind) for e in discover(g).endpoints] == [("mine", "function")]


def test_concurrency_modifier_must_be_readable_or_set(tmp_path):
    f = write(
        tmp_path,
        """
        import runpod

        MAX = 8

        async def handler(job):
            return 1

        def adjust(current):
            if current < MAX:
                return current + 1
            return MAX

        runpod.serverless.start({"handler": handler, "concurrency_modifier": adjust})
    """,
    )
    d = discover(f)
    assert d.endpoints == [] and len(d.problems) == 1, d
    assert "--set worker.max_concurrency=N" in d.problems[0], d.problems
    d = discover(f, parse_overrides(["worker.max_concurrency=8", "worker.name=llm"]))
    assert not d.problems and [(e.name, e.config.max_concurrency) for e in d.endpoints] == [
        ("llm", 8)
    ]
    g = write(tmp_path, """
        import runpod

        LIMIT = 4

        def handler(job):
            return 1

        runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda c: LIMIT})
    """, "lam.py")  # fmt: skip
    [e] = discover(g).endpoints
    assert e.config.max_concurrency == 4


def test_requirements_follow_r_files_and_leave_options_out(tmp_path):
    (tmp_path / "base.txt").write_text("numpy==2.1.3  # pinned\n")
    (tmp_path / "requirements.txt").write_text(
        "-r base.txt\nrunpod>=1.7 \\\n  ; python_version >= '3.9'\n--index-url https://x\n\n"
        "torch --hash=sha256:abc\n"
    )
    f = write(tmp_path, """
        import runpod
        def handler(job):
            return 1
        runpod.serverless.start({"handler": handler})
    """)  # fmt: skip
    d = discover(f)
    [e] = d.endpoints
    assert e.config.dependencies == (
        "numpy==2.1.3", "runpod>=1.7 ; python_version >= '3.9'", "torch"
    ), e.config.dependencies  # fmt: skip
    assert any("--index-url" in n and "left out" in n for n in d.notes), d.notes
