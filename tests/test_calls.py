"""Calling endpoints from Python: values, closures, output, submit/map, async, classes."""

from __future__ import annotations

import asyncio
import io
import sys
import threading
import time

import numpy as np
import pytest

from flash_jupyter import Endpoint

SCALE = 3


def helper(x):
    return x * SCALE


def test_square_example(client, name, capsys):
    @Endpoint(name=name, gpu="A100", workers=(0, 2), idle_timeout=5)
    def square(x):
        print("working on", x)
        return helper(x) ** 2

    assert square(4) == 144
    assert "working on 4" in capsys.readouterr().out

    job = square.submit(5)
    assert len(job.id) >= 16
    assert job.result(timeout=30) == 225
    assert job.status() == "COMPLETED"
    info = job.info()
    assert info["workerId"].startswith(name)
    assert info["executionTime"] >= 0 and info["delayTime"] >= 0

    assert square.map(range(100)) == [(3 * i) ** 2 for i in range(100)]


def test_globals_are_taken_at_call_time(client, name):
    import __main__

    exec("OFFSET = 10\ndouble = lambda y: y * 2\ndef fn(x):\n    return double(x) + OFFSET\n",
         __main__.__dict__)  # fmt: skip
    try:
        remote = Endpoint(name=name)(__main__.fn)
        assert remote(1) == 12
        __main__.OFFSET = 20
        assert remote(1) == 22
    finally:
        for k in ("OFFSET", "double", "fn"):
            __main__.__dict__.pop(k, None)


def test_notebook_class_and_lambda_travel_by_value(client, name):
    class Acc:
        def __init__(self, k):
            self.k = k

        def add(self, v):
            return self.k + v

    f = lambda a: Acc(a).add(1)  # noqa: E731

    @Endpoint(name=name)
    def use(a):
        return f(a), type(Acc(0)).__name__

    assert use(41) == (42, "Acc")


def test_output_streams_while_job_runs(client, name):
    @Endpoint(name=name)
    def slow():
        print("before", flush=True)
        time.sleep(1.5)
        print("after")
        return "done"

    slow()  # warm the worker: this test is about streaming, not cold start
    seen: list[tuple[float, str]] = []

    class Recorder(io.TextIOBase):
        def write(self, s):
            seen.append((time.monotonic(), s))
            return len(s)

    job = slow.submit()
    old = sys.stdout
    sys.stdout = Recorder()
    try:
        assert job.result(timeout=30) == "done"
        t_end = time.monotonic()
    finally:
        sys.stdout = old
    text = "".join(s for _, s in seen)
    assert "before" in text and "after" in text
    t_before = next(t for t, s in seen if "before" in s)
    # "before" arrived at least a second before the job ended: it streamed.
    assert t_end - t_before > 1.0


def test_stderr_streams_too(client, name, capsys):
    @Endpoint(name=name)
    def warn():
        print("careful", file=sys.stderr)
        return 1

    assert warn() == 1
    assert "careful" in capsys.readouterr().err


def test_async_def_gives_awaitable(client, name):
    @Endpoint(name=name)
    async def add(a, b):
        await asyncio.sleep(0.01)
        return a + b

    async def main():
        aw = add(2, 3)
        assert asyncio.iscoroutine(aw)
        return await aw, await asyncio.gather(add(1, 1), add(2, 2))

    assert asyncio.run(main()) == (5, [2, 4])


def test_blocking_call_inside_running_loop(client, name):
    """A notebook kernel runs an event loop; a plain call must still block and return."""

    @Endpoint(name=name)
    def inc(x):
        return x + 1

    async def main():
        return inc(1)

    assert asyncio.run(main()) == 2


def test_class_constructed_once_per_worker(client, name):
    @Endpoint(name=name, workers=1)
    class Counter:
        def __init__(self, start):
            import os

            self.n = start
            self.pid = os.getpid()

        def bump(self):
            self.n += 1
            return self.n, self.pid

    c = Counter(10)
    first = c.bump()
    second = c.bump()
    assert first[0] == 11 and second[0] == 12
    assert first[1] == second[1]
    other = Counter(100)  # different constructor arguments: another instance
    assert other.bump()[0] == 101


def test_submit_status_and_cancel_handle(client, name):
    @Endpoint(name=name)
    def nap(t):
        time.sleep(t)
        return t

    job = nap.submit(0.2)
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert job.result(timeout=30) == 0.2
    assert job.done()


def test_large_arrays_round_trip(client, name):
    @Endpoint(name=name)
    def twice(a):
        a *= 2  # inputs arrive writable, like local arguments
        return a

    arr = np.arange(5_000_000, dtype=np.float64)  # 40 MB: out-of-band, shared memory
    out = twice(arr)
    assert out.dtype == np.float64 and out.shape == arr.shape
    assert np.array_equal(out, arr * 2)
    assert arr[1] == 1.0  # the caller's array is untouched
    out[0] = 5  # results are writable too


def test_bytes_and_small_arrays(client, name):
    @Endpoint(name=name)
    def echo(*a):
        return a

    small = np.ones(10)
    big = b"x" * (2 << 20)
    r = echo(small, big, {"k": [1, 2]})
    assert np.array_equal(r[0], small) and r[1] == big and r[2] == {"k": [1, 2]}


def test_concurrent_callers_from_threads(client, name):
    @Endpoint(name=name, workers=2)
    def ident(x):
        return x

    results = {}

    def run(i):
        results[i] = ident(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {i: i for i in range(8)}


def test_local_runs_here(client, name):
    @Endpoint(name=name)
    def where():
        import os

        return os.getpid()

    import os

    assert where.local() == os.getpid()
    assert where() != os.getpid()


@pytest.mark.parametrize("n", [0, 1])
def test_map_edge_sizes(client, name, n):
    @Endpoint(name=name)
    def neg(x):
        return -x

    assert neg.map(range(n)) == [-i for i in range(n)]


def test_spool_files_are_recycled_without_corrupting_live_data(client, name):
    import gc
    import os

    @Endpoint(name=name)
    def plus_one(a):
        return a + 1  # a new 2.4 MB array, written to the worker's spool

    kept = plus_one(np.full(300_000, 100.0))  # stays alive: its file must never be rewritten
    for i in range(6):
        out = plus_one(np.full(300_000, float(i)))
        assert out[0] == i + 1 and out[-1] == i + 1
        del out
        gc.collect()
    assert kept.min() == kept.max() == 101.0
    assert client.spool is not None, "same host: large buffers go through shared memory"
    # The client rewrote released input files instead of making a new one per call.
    time_limit = 5
    import time

    t = time.monotonic()
    while len(os.listdir(client.spool.dir)) > 2 and time.monotonic() - t < time_limit:
        time.sleep(0.05)
    assert len(os.listdir(client.spool.dir)) <= 2


def test_output_of_subprocesses_and_c_code_is_captured(client, name, capsys):
    @Endpoint(name=name)
    def shell():
        import os
        import subprocess

        subprocess.run(["echo", "from a subprocess"], check=True)
        os.write(2, b"straight to fd 2\n")
        return 0

    assert shell() == 0
    out = capsys.readouterr()
    assert "from a subprocess" in out.out
    assert "straight to fd 2" in out.err


def test_import_of_a_local_module_inside_the_function(client, name, tmp_path, monkeypatch):
    (tmp_path / "fj_localmod.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    @Endpoint(name=name)
    def use_it(x):
        import fj_localmod  # only this notebook's folder has it

        return fj_localmod.triple(x)

    assert use_it(5) == 15


def meet(folder: str, me: int, n: int) -> int:
    """Say this job runs, then wait until ``n`` jobs do (all at once, or the wait fails)."""
    import os
    import time

    open(os.path.join(folder, str(me)), "w").close()
    deadline = time.monotonic() + 20
    while len(os.listdir(folder)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {me} ran alone: {sorted(os.listdir(folder))} of {n}")
        time.sleep(0.01)
    return os.getpid()


def test_max_concurrency_runs_jobs_side_by_side_on_one_worker(client, name, tmp_path):
    nap = Endpoint(name=name, workers=1, max_concurrency=3)(meet)
    jobs = [nap.submit(str(tmp_path), i, 3) for i in range(3)]
    pids = {j.result(timeout=60) for j in jobs}  # each returns only once all three ran at once
    assert len(pids) == 1  # one worker


def test_async_functions_run_side_by_side_on_one_worker(client, name, tmp_path):
    """Found: two async jobs at once on a worker with max_concurrency > 1 shared one event
    loop across its threads ("This event loop is already running")."""

    @Endpoint(name=name, workers=1, max_concurrency=2)
    async def anap(folder, me):
        import asyncio

        await asyncio.sleep(0)
        return meet(folder, me, 1 if folder.endswith("first") else 2)

    first = tmp_path / "first"
    first.mkdir()
    anap.submit(str(first), 0).result(timeout=60)  # the worker's event loop exists now
    jobs = [anap.submit(str(tmp_path), i) for i in range(2)]
    assert len({j.result(timeout=60) for j in jobs}) == 1


def test_a_client_on_another_host_gets_large_results_inline(server, monkeypatch, name):
    """A caller that cannot map the control plane's shared memory (another machine) sends
    and receives large buffers over the socket."""
    from conftest import use_server

    from flash_jupyter import client as fj_client
    from flash_jupyter import paths

    monkeypatch.setattr(paths, "boot_id", lambda: "another-machine")
    c = use_server(server, monkeypatch)
    try:
        assert c.spool is None and not c.same_host

        @Endpoint(name=name)
        def grow(a):
            return np.concatenate([a, a])

        arr = np.arange(1_000_000, dtype=np.float64)  # 8 MB each way
        job = grow.submit(arr)
        out = job.result(timeout=30)
        assert out.shape == (2_000_000,) and out[1_000_001] == 1.0
        # Every buffer came in the frame itself, none as a shared-memory file to map.
        assert all(isinstance(r, int) for r in job._state.outcome["refs"])
    finally:
        fj_client.reset_client()
