"""The Flash sidebar in a real JupyterLab driven by a real browser (Debian's Chromium through
Playwright): the panel shows a cell's worker cold-start, run, cost and scale-down live, a
selected ``%%flash`` cell's endpoint warms up before it runs, and a budget set from the panel
refuses the next cell; each card button (Warm, Scale, Stop, Purge, Delete) acts on the control
plane, checked through its own HTTP API; the ``prewarm`` setting ``on-open`` warms a notebook's
``%%flash`` endpoints when it opens, and ``off`` warms nothing on selection.

JupyterLab runs on 127.0.0.1 (``jupyter_app.start_jupyter``) with temporary root, config,
settings and workspace folders, against a test control plane of its own
(``FLASH_JUPYTER_URL``/``TOKEN``); the server extension is enabled explicitly and the built
extension (``flash_jupyter/labextension_dist``, built by ``./dev setup``) is given to Lab with
``--LabApp.extra_labextensions_path``, which comes before the environment's own folders.
Screenshots go to the test's tmp folder and are copied to the folder the test prints.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import use_server, wait_for
from jupyter_app import JupyterApp, start_jupyter

import flash_jupyter

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
BUILT = Path(flash_jupyter.__file__).parent / "labextension_dist"
SCREENSHOTS = Path(
    os.environ.get("FLASH_JUPYTER_SCREENSHOTS")
    or Path(tempfile.gettempdir()) / "flash-jupyter-sidebar-screenshots"
)
NOTEBOOK = "flash.ipynb"

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - ./dev test installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(
        sync_playwright is None,
        reason="playwright is not installed (pip install -e '.[test]', or ./dev test)",
    ),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason="no chromium: install Debian's chromium package (./dev test does, as root)",
    ),
    pytest.mark.timeout(300),
]


# ---------------------------------------------------------------- JupyterLab


def write_notebook(path: Path, cells: list[str], data_dir: Path) -> None:
    """The notebook, signed with the secret of the Jupyter whose data folder is ``data_dir``
    (as Jupyter signs what it saves): prewarm acts only on trusted cells."""
    import nbformat
    from nbformat.sign import NotebookNotary

    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(src) for src in cells],
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
    )
    nbformat.write(nb, path)
    data_dir.mkdir(parents=True, exist_ok=True)
    NotebookNotary(data_dir=str(data_dir)).sign(nbformat.read(path, as_version=4))


def start_lab(tmp: Path, flash_env: dict[str, str], notebooks: dict[str, list[str]]) -> JupyterApp:
    """``jupyter lab`` with the server extension on, the built extension first on the
    extensions path, its own settings and workspaces, the ``notebooks`` (name -> cells) in its
    root, and ``flash_env`` (how to find the control plane) as its FLASH_JUPYTER_* variables."""
    if not (BUILT / "package.json").exists():
        pytest.fail(f"the JupyterLab extension is not built ({BUILT}): run ./dev setup")
    settings, work, exts = (tmp / d for d in ("settings", "workspaces", "labextensions"))
    for d in (tmp / "root", settings, work, exts):
        d.mkdir(parents=True)
    for nb, cells in notebooks.items():
        write_notebook(tmp / "root" / nb, cells, tmp / "data")
    (exts / "flash-jupyter").symlink_to(BUILT)
    # No news or update toasts over the screenshots.
    notif = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {**flash_env, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(work)}  # fmt: skip
    args = ["--ServerApp.jpserver_extensions=flash_jupyter=True",
            f"--LabApp.extra_labextensions_path={exts}", "--LabApp.news_url=None",
            "--LabApp.expose_app_in_browser=True"]  # fmt: skip
    return start_jupyter("jupyterlab", tmp, args, env, timeout=60)


# ---------------------------------------------------------------- the page

# Every change of a worker row in the panel, as the browser rendered it (a MutationObserver
# sees each commit, so a state that lasted one frame is not missed by polling).
RECORDER = """() => {
  const log = [];
  const seen = new Map();
  const scan = () => {
    for (const row of document.querySelectorAll('.fj-endpoint [data-worker]')) {
      const ep = row.closest('[data-endpoint]').dataset.endpoint;
      const down = row.querySelector('[data-scale-down-in]');
      const v = [row.dataset.state, row.dataset.busy, row.classList.contains('fj-billed'),
                 down !== null, row.dataset.phase].join('|');
      const key = ep + '/' + row.dataset.worker;
      if (seen.get(key) !== v) {
        seen.set(key, v);
        log.push({t: performance.now(), ep, worker: row.dataset.worker,
                  state: row.dataset.state, busy: row.dataset.busy === 'true',
                  billed: row.classList.contains('fj-billed'), countdown: down !== null,
                  phase: row.dataset.phase});
      }
    }
  };
  new MutationObserver(scan).observe(document.body, {subtree: true, childList: true,
    attributes: true, attributeFilter: ['data-state', 'data-busy', 'data-phase', 'class']});
  window.__fjLog = log;
}"""


COST_ABOVE = (
    "(c0) => Number(document.querySelector('[data-session-cost]').dataset.sessionCost) > c0"
)


def cell(page: Page, i: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(i)


def select(page: Page, i: int) -> None:
    cell(page, i).locator(".jp-InputArea-editor").click()


def run_cell(page: Page, i: int, timeout: float = 60) -> str:
    """Run cell ``i`` (Ctrl+Enter keeps it on screen) and wait for its prompt's number; its
    output text."""
    before = prompt(page, i)
    select(page, i)
    page.keyboard.press("Control+Enter")
    page.wait_for_function(
        """([i, before]) => {
          const c = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
          const p = c && c.querySelector('.jp-InputPrompt').textContent.trim();
          return p && /^\\[\\d+\\]:$/.test(p) && p !== before;
        }""",
        arg=[i, before],
        timeout=timeout * 1000,
    )
    return cell(page, i).locator(".jp-OutputArea").inner_text()


def prompt(page: Page, i: int) -> str:
    return cell(page, i).locator(".jp-InputPrompt").inner_text().strip()


def session_cost(page: Page) -> float:
    return float(page.locator("[data-session-cost]").get_attribute("data-session-cost"))


def worker_log(page: Page, ep: str) -> list[dict]:
    return [e for e in page.evaluate("() => window.__fjLog") if e["ep"] == ep]


def wait_js(page: Page, js: str, arg=None, timeout: float = 30, what: str = "") -> None:
    try:
        page.wait_for_function(js, arg=arg, timeout=timeout * 1000)
    except Exception as e:
        raise AssertionError(f"timed out waiting for {what or js}") from e


# ---------------------------------------------------------------- the test


NOTEBOOK_READY = """(path) => {
    const app = window.jupyterapp;
    const w = app && app.shell.currentWidget;
    const k = w && w.context && w.context.path === path &&
              w.sessionContext.session && w.sessionContext.session.kernel;
    return k && k.status === 'idle';
}"""


class Labs:
    """What a test drives: JupyterLab servers it starts, and Chromium pages on them. Each
    page logs the events its panel heard (``events.log``, numbered by page) and every call it
    made to the server extension (``calls[page]``); ``shot`` writes a screenshot, copied to
    SCREENSHOTS at the end."""

    def __init__(self, browser, tmp: Path) -> None:
        self.browser = browser
        self.tmp = tmp
        self.shots = tmp / "screenshots"
        self.shots.mkdir()
        self.labs: list[JupyterApp] = []
        self.calls: dict[Page, list[str]] = {}
        # What each page's panel heard (line-buffered, page number first), for a failure.
        self.events = open(tmp / "events.log", "a", buffering=1)

    @property
    def lab(self) -> JupyterApp:
        return self.labs[-1]

    def __call__(self, flash_env: dict[str, str], cells: list[str],
                 notebooks: dict[str, list[str]] | None = None):  # fmt: skip
        """Start Lab with ``NOTEBOOK`` of ``cells`` (and other ``notebooks``) and open it:
        the page and ``shot(name)`` for it."""
        tmp = self.tmp / f"lab{len(self.labs)}"
        self.labs.append(start_lab(tmp, flash_env, {NOTEBOOK: cells, **(notebooks or {})}))
        page = self.open(NOTEBOOK)
        return page, lambda name: self.shot(page, name)

    def open(self, notebook: str) -> Page:
        """A new page of the latest Lab, opening ``notebook``, once its kernel is idle."""
        lab = self.lab
        page = self.browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("pageerror", lambda e: print("page error:", e))
        calls = self.calls[page] = []
        n = len(self.calls)

        def on_socket(ws) -> None:
            if "flash-jupyter/api/events" in ws.url:
                ws.on("framereceived", lambda f: self.events.write(f"{time.time():.3f} {n} {f}\n"))

        def on_request(r) -> None:
            # "METHOD /route body", without the cache-busting query Lab adds to each URL
            path = r.url.split("/flash-jupyter/api", 1)
            if len(path) == 2:
                calls.append(f"{r.method} {path[1].split('?')[0]} {r.post_data or ''}".strip())

        page.on("websocket", on_socket)
        page.on("request", on_request)
        page.goto(f"{lab.url}/lab/tree/{notebook}?reset&token={lab.token}")
        wait_js(page, NOTEBOOK_READY, arg=notebook, timeout=90,
                what=f"{notebook} and its kernel")  # fmt: skip
        page.evaluate(RECORDER)
        return page

    def shot(self, page: Page, name: str) -> None:
        page.screenshot(path=str(self.shots / f"{name}.png"))

    def set_prewarm(self, mode: str) -> None:
        """The user's ``prewarm`` setting, through Lab's settings REST API (read by pages
        loaded after this)."""
        r = httpx.put(f"{self.lab.url}/lab/api/settings/flash-jupyter:plugin",
                      json={"raw": json.dumps({"prewarm": mode})},
                      headers={"Authorization": f"token {self.lab.token}"})  # fmt: skip
        assert r.status_code in (200, 204), r.text

    def close(self) -> None:
        for lab in self.labs:
            lab.stop()
        self.events.close()
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for png in self.shots.glob("*.png"):
            shutil.copy(png, SCREENSHOTS / png.name)


@pytest.fixture
def open_lab(tmp_path: Path, capsys) -> Iterator[Labs]:
    """Chromium, and ``Labs`` to start JupyterLab and open pages on it."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        labs = Labs(browser, tmp_path)
        try:
            yield labs
        finally:
            browser.close()
            labs.close()
            if any(labs.shots.glob("*.png")):
                with capsys.disabled():
                    print(f"\nsidebar screenshots: {SCREENSHOTS} (this run: {labs.shots})")


def open_panel(page: Page) -> None:
    """The Flash panel, from its flash icon in the left bar."""
    page.locator('.jp-SideBar [data-id="flash-jupyter-sidebar"]').click()
    page.locator("#flash-jupyter-sidebar .fj-panel").wait_for()


def test_sidebar_live_prewarm_and_budget(open_lab, own_server) -> None:
    # A control plane of its own: no spare worker, so a cold start is a process start long
    # enough to be seen (with the spare it takes a couple of ms), and the budget set here
    # holds no other test.
    server = own_server(FLASH_JUPYTER_SPARE_WORKERS="0")
    a = f"sidebar-a-{secrets.token_hex(2)}"
    b = f"sidebar-b-{secrets.token_hex(2)}"
    cells = [
        "%load_ext flash_jupyter",
        f"%%flash gpu=A100 workers=0,1 idle_timeout=4 name={a}\n"
        "total = sum(range(1000))\nprint('total', total)",
        f"%%flash gpu=A100 workers=0,1 idle_timeout=60 name={b}\nprint('b ran')",
        f"%%flash name={b}\nprint('after the budget')",
    ]
    env = {"FLASH_JUPYTER_URL": server.url, "FLASH_JUPYTER_TOKEN": server.token}
    page, shot = open_lab(env, cells)
    run_cell(page, 0)  # %load_ext flash_jupyter

    # The Flash panel, connected to the test's control plane.
    open_panel(page)
    panel = page.locator("#flash-jupyter-sidebar")
    wait_js(page, "() => !!document.querySelector('.fj-panel[data-synced=\"true\"]')",
            what="the panel to connect to the control plane")  # fmt: skip
    cost0 = session_cost(page)
    shot("1-panel")

    # Run the first %%flash cell: its worker cold-starts, runs, and its cost rises.
    out = run_cell(page, 1)
    assert "total 499500" in out, out
    card_a = panel.locator(f'[data-endpoint="{a}"]')
    card_a.wait_for()
    wait_js(page, """(ep) => window.__fjLog.some(e => e.ep === ep && e.state === 'Running')""",
            arg=a, what=f"{a}'s worker to show Running")  # fmt: skip
    states = [e["state"] for e in worker_log(page, a)]
    assert "Initializing" in states, states
    assert states.index("Initializing") < len(states) - 1 - states[::-1].index("Running"), states
    assert any(e["billed"] for e in worker_log(page, a) if e["state"] == "Running")
    wait_js(page, COST_ABOVE, arg=cost0, what="the session cost to rise")
    cost1 = session_cost(page)
    assert cost1 > cost0
    shot("2-ran-first-cell")

    # Idle for idle_timeout (4 s): a countdown shows, then the worker scales down.
    wait_js(page, """(ep) => window.__fjLog.some(e => e.ep === ep && e.countdown)""", arg=a,
            what="the countdown to scale-down")  # fmt: skip
    wait_js(page, """(ep) => {
        const rows = document.querySelectorAll(`[data-endpoint="${ep}"] [data-worker]`);
        return [...rows].every(r => r.dataset.state !== 'Running' &&
                                    r.dataset.state !== 'Initializing');
    }""", arg=a, timeout=40, what=f"{a}'s worker to scale down")  # fmt: skip
    assert session_cost(page) >= cost1
    shot("3-scaled-down")

    # Select (do not run) the second cell: its endpoint appears and warms up before it runs.
    select(page, 2)
    card_b = panel.locator(f'[data-endpoint="{b}"]')
    card_b.wait_for(timeout=30000)
    wait_js(page, """(ep) => !!document.querySelector(
        `[data-endpoint="${ep}"] [data-worker][data-state="Running"][data-busy="false"]`)""",
            arg=b, what=f"{b} to be warmed by selecting its cell")  # fmt: skip
    assert prompt(page, 2) in ("[ ]:", ""), "the second cell ran before it was warmed"
    assert "Initializing" in [e["state"] for e in worker_log(page, b)]
    shot("4-prewarmed")
    assert "b ran" in run_cell(page, 2)
    wait_js(page, """(ep) => {
        const s = document.querySelector(`[data-endpoint="${ep}"] .fj-starts`);
        return s && Number(s.dataset.warm) >= 1 && Number(s.dataset.cold) === 0;
    }""", arg=b, what=f"{b}'s run to count as a warm start")  # fmt: skip

    # A budget below what the session spent, set from the panel: reached, and the next cell
    # is refused with a clear error.
    panel.locator(".fj-budget .fj-link").click()
    dialog = page.locator(".jp-Dialog")
    dialog.locator("input").fill("0.000001")
    dialog.locator(".jp-mod-accept").click()
    wait_js(page, "() => !!document.querySelector('[data-budget-state=\"reached\"]')",
            what="the panel to show the budget reached")  # fmt: skip
    assert "reached" in panel.locator(".fj-budget").inner_text()
    out = run_cell(page, 3)
    assert "budget" in out.lower(), out
    assert "BudgetExceeded" in out or "reached" in out.lower(), out
    page.set_viewport_size({"width": 1400, "height": 1100})
    shot("5-budget-reached")


def test_sidebar_without_control_plane_offers_start(open_lab, tmp_path: Path) -> None:
    # No control plane for this data directory: the panel says so and offers Start (no bare
    # error); Start starts the machine-local one and the panel goes live.
    home = tmp_path / "home"
    home.mkdir()
    page, shot = open_lab({"FLASH_JUPYTER_HOME": str(home)}, ["print('no flash here')"])
    try:
        open_panel(page)
        status = page.locator('.fj-status[data-connection="down"]')
        status.wait_for(timeout=30000)
        text = status.inner_text()
        assert "not running" in text, text
        assert "error" not in text.lower(), text
        shot("6-no-control-plane")
        status.locator("button.fj-start").click()
        wait_js(page, "() => !!document.querySelector('.fj-panel[data-synced=\"true\"]')",
                timeout=60, what="the panel to go live after Start")  # fmt: skip
        assert "No endpoints yet" in page.locator("#flash-jupyter-sidebar").inner_text()
        shot("7-started")
    finally:
        subprocess.run(
            [sys.executable, "-m", "flash_jupyter.cli", "shutdown"],
            env={**os.environ, "FLASH_JUPYTER_HOME": str(home)},
            capture_output=True,
            timeout=60,
        )


# ---------------------------------------------------------------- the card actions, the setting

LIVE = ("Initializing", "Running")
PREWARM_DEBOUNCE_S = 0.3  # prewarm.ts: a selection must rest this long before it warms


def live(cp: httpx.Client, name: str) -> list[dict]:
    """The endpoint's workers that have or are starting a process, as the control plane says."""
    r = cp.get(f"/v1/endpoints/{name}")
    assert r.status_code == 200, r.text
    return [w for w in r.json()["workers"] if w["state"] in LIVE]


def workers_range(cp: httpx.Client, name: str) -> tuple[int, int]:
    c = cp.get(f"/v1/endpoints/{name}").json()["config"]
    return c["workers_min"], c["workers_max"]


def card(page: Page, ep: str):
    return page.locator(f'#flash-jupyter-sidebar [data-endpoint="{ep}"]')


def button(page: Page, ep: str, label: str):
    return card(page, ep).locator(".fj-actions button", has_text=label)


def card_shows_live(page: Page, ep: str, yes: bool = True) -> None:
    wait_js(page, """([ep, yes]) => yes === [...document.querySelectorAll(
        `[data-endpoint="${ep}"] [data-worker]`)].some(r => r.dataset.state === 'Running' ||
                                                            r.dataset.state === 'Initializing')""",
            arg=[ep, yes], what=f"{ep}'s card to show live workers: {yes}")  # fmt: skip


def test_sidebar_card_actions_and_prewarm_settings(
    open_lab: Labs, own_server, tmp_path: Path, monkeypatch
) -> None:
    server = own_server()
    tag = secrets.token_hex(2)
    acts, queued, onopen, off, other = (
        f"{k}-{tag}" for k in ("acts", "q", "onopen", "off", "other")
    )
    gate = tmp_path / "gate"
    with server.http() as cp:
        for ep in (acts, other):
            r = cp.put(f"/v1/endpoints/{ep}",
                       json={"workers_min": 0, "workers_max": 2, "idle_timeout": 60})  # fmt: skip
            assert r.status_code == 200, r.text
        # A function endpoint whose one worker stays busy until the test creates `gate`.
        use_server(server, monkeypatch)
        from flash_jupyter import Endpoint

        @Endpoint(name=queued, workers=(0, 1), idle_timeout=60)
        def wait_for_gate(path: str) -> str:
            import os
            import time

            while not os.path.exists(path):
                time.sleep(0.02)
            return "opened"

        wait_for_gate.deploy()

        def flash_nb(ep: str) -> list[str]:
            # The %%flash cell is not the first: opening the notebook does not select it.
            return ["print('first')", f"%%flash name={ep} workers=0,1 idle_timeout=60\nprint(1)"]

        env = {"FLASH_JUPYTER_URL": server.url, "FLASH_JUPYTER_TOKEN": server.token}
        notebooks = {"on-open.ipynb": flash_nb(onopen), "off.ipynb": flash_nb(off)}
        page, shot = open_lab(env, ["print('actions')"], notebooks)
        open_panel(page)
        card(page, acts).wait_for()
        assert not live(cp, acts)

        # Warm: a worker starts for an endpoint that has none.
        button(page, acts, "Warm").click()
        wait_for(lambda: live(cp, acts), timeout=30, what=f"a worker of {acts} after Warm")
        card_shows_live(page, acts)
        shot("8-warm")

        # Scale: the dialog's numbers become the endpoint's settings.
        button(page, acts, "Scale").click()
        dialog = page.locator(".jp-Dialog")
        inputs = dialog.locator(".fj-scale-body input")
        inputs.nth(0).fill("1")
        inputs.nth(1).fill("2")
        shot("9-scale-dialog")
        dialog.locator(".jp-mod-accept").click()
        wait_for(lambda: workers_range(cp, acts) == (1, 2), what=f"{acts} scaled to 1..2")
        card(page, acts).locator(".fj-ep-line", has_text="workers 1..2").wait_for()
        shot("10-scaled")

        # Stop: scaled to zero, the workers go.
        button(page, acts, "Stop").click()
        wait_for(lambda: workers_range(cp, acts)[0] == 0 and not live(cp, acts), timeout=30,
                 what=f"{acts}'s workers to stop")  # fmt: skip
        card_shows_live(page, acts, yes=False)
        shot("11-stopped")

        # Purge: with the only worker busy, two jobs wait; Purge cancels them, not the running one.
        jobs = []
        for _ in range(3):
            r = cp.post(f"/v2/{queued}/run", json={"input": {"path": str(gate)}})
            assert r.status_code == 200, r.text
            jobs.append(r.json()["id"])

        def statuses() -> list[str]:
            return sorted(cp.get(f"/v2/{queued}/status/{j}").json()["status"] for j in jobs)

        wait_for(lambda: statuses() == ["IN_PROGRESS", "IN_QUEUE", "IN_QUEUE"], timeout=30,
                 what="one job running and two queued")  # fmt: skip
        card(page, queued).locator('[data-queue="2"]').wait_for()
        assert button(page, queued, "Purge").is_enabled()
        shot("12-queued")
        button(page, queued, "Purge").click()
        wait_for(lambda: statuses() == ["CANCELLED", "CANCELLED", "IN_PROGRESS"],
                 what="the queued jobs cancelled")  # fmt: skip
        assert cp.get(f"/v2/{queued}/health").json()["jobs"]["inQueue"] == 0
        card(page, queued).locator('[data-queue="0"]').wait_for()
        shot("13-purged")
        gate.touch()
        wait_for(lambda: "COMPLETED" in statuses(), timeout=30, what="the running job to finish")

        # Delete: after confirming, the endpoint and its card are gone.
        button(page, acts, "Delete").click()
        dialog.locator(".jp-mod-accept").wait_for()
        shot("14-delete-dialog")
        dialog.locator(".jp-mod-accept").click()
        wait_for(lambda: cp.get(f"/v1/endpoints/{acts}").status_code == 404,
                 what=f"{acts} deleted")  # fmt: skip
        card(page, acts).wait_for(state="detached")
        shot("15-deleted")
        page.close()

        # prewarm = on-open: opening a notebook warms its %%flash cell's endpoint, unselected.
        open_lab.set_prewarm("on-open")
        page = open_lab.open("on-open.ipynb")
        wait_for(lambda: cp.get(f"/v1/endpoints/{onopen}").status_code == 200
                 and live(cp, onopen), timeout=30, what=f"{onopen} warmed on open")  # fmt: skip
        active = "() => window.jupyterapp.shell.currentWidget.content.activeCellIndex"
        assert page.evaluate(active) == 0
        assert prompt(page, 1) in ("[ ]:", ""), "the %%flash cell ran"
        calls = open_lab.calls[page]
        assert [c for c in calls if c.startswith("POST /prewarm") and onopen in c], calls
        open_panel(page)
        card_shows_live(page, onopen)
        open_lab.shot(page, "16-prewarm-on-open")
        page.close()

        # prewarm = off: selecting the %%flash cell warms nothing. Past the selection's debounce,
        # warm another endpoint from its card: the page asked for that, and never for a prewarm.
        open_lab.set_prewarm("off")
        page = open_lab.open("off.ipynb")
        select(page, 1)
        t = page.evaluate("() => performance.now()")
        open_panel(page)
        wait_js(page, "(t) => performance.now() > t", arg=t + 2000 * PREWARM_DEBOUNCE_S,
                what="the selection's debounce to pass")  # fmt: skip
        with page.expect_request(lambda r: f"/endpoints/{other}/warm?" in r.url):
            button(page, other, "Warm").click()
        wait_for(lambda: live(cp, other), timeout=30, what=f"a worker of {other} after Warm")
        card_shows_live(page, other)
        calls = open_lab.calls[page]
        assert [c for c in calls if c.startswith(f"POST /endpoints/{other}/warm")], calls
        assert not [c for c in calls if c.startswith("POST /prewarm")], calls
        assert cp.get(f"/v1/endpoints/{off}").status_code == 404
        assert card(page, off).count() == 0
        assert prompt(page, 1) in ("[ ]:", "")
        open_lab.shot(page, "17-prewarm-off")
