"""flash-jupyter as an engine of the peer harness (../shared/peers/common.py).

The same adapter shape as the harness's bench_ray.py / bench_dask.py: start / call /
submit_many / map_many / stop, with the same workload, so the figures are comparable.

start() begins exactly where a user begins: no control plane running, an empty data dir.
The first call starts the control plane (detached) and cold-starts a worker, so "cold
start to first result" covers everything a fresh notebook pays.

    python bench/bench_flash.py cold|warm      (PERF_PEERS=path/to/peers if not beside)
"""

import os
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.environ.get("PERF_PEERS") or (
    HERE if os.path.exists(os.path.join(HERE, "common.py"))
    else os.path.join(HERE, "..", "..", "shared", "peers")
)  # fmt: skip
sys.path.insert(0, PEERS)
import common


class Engine:
    name = "flash-jupyter(2 workers)"
    map_name = "remote.map"

    def start(self):
        self.home = tempfile.mkdtemp(prefix="flash-bench-")
        os.environ["FLASH_JUPYTER_HOME"] = self.home
        os.environ.pop("FLASH_JUPYTER_URL", None)
        from flash_jupyter import Endpoint

        self.Endpoint = Endpoint
        self.remotes = {}

    def _remote(self, f):
        r = self.remotes.get(id(f))
        if r is None:
            # One endpoint, two workers, like the peers' two-worker clusters.
            r = self.remotes[id(f)] = (f, self.Endpoint(name="bench", workers=(0, 2),
                                                        idle_timeout=600)(f))  # fmt: skip
        return r[1]

    def call(self, f, *args):
        return self._remote(f)(*args)

    def submit_many(self, f, argslist):
        r = self._remote(f)
        jobs = [r.submit(*a) for a in argslist]
        return [j.result() for j in jobs]

    def map_many(self, f, xs):
        return self._remote(f).map(xs)

    def stop(self):
        from flash_jupyter import client, paths

        info = paths.read_runtime()
        client.reset_client()
        if info:
            pid = int(info["pid"])
            os.kill(pid, signal.SIGTERM)
            for _ in range(400):
                try:
                    os.waitpid(pid, os.WNOHANG)
                    os.kill(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    break
                time.sleep(0.025)


if __name__ == "__main__":
    common.main(Engine)
