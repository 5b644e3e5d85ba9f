"""The Flash sidebar in a real JupyterLab driven by a real browser (Debian's Chromium through
Playwright): the panel shows a cell's worker cold-start, run, cost and scale-down live, a
selected ``%%flash`` cell's endpoint warms up before it runs, and a budget set from the panel
refuses the next cell.

JupyterLab runs on 127.0.0.1 with a temporary root, config, settings and workspace folders,
against a test control plane of its own (``FLASH_JUPYTER_URL``/``TOKEN``); the server
extension is enabled explicitly and the built extension (``flash_jupyter/labextension_dist``,
built by ``./dev setup``) is given to Lab with ``--LabApp.extra_labextensions_path``, which
comes before the environment's own folders. Screenshots go to the test's tmp folder and are
copied to the folder the test prints.
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
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import free_port

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


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    log_path: Path
    proc: subprocess.Popen

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""


def write_notebook(path: Path, cells: list[str]) -> None:
    nb = {
        "cells": [
            {"cell_type": "code", "metadata": {}, "source": src, "outputs": [],
             "execution_count": None}
            for src in cells
        ],
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }  # fmt: skip
    path.write_text(json.dumps(nb, indent=1))


def start_lab(tmp: Path, flash_env: dict[str, str], cells: list[str]) -> Lab:
    """``jupyter lab`` on 127.0.0.1 with its own folders, the server extension on, the built
    extension first on the extensions path, and ``flash_env`` (how to find the control
    plane) in place of the caller's FLASH_JUPYTER_* variables."""
    if not (BUILT / "package.json").exists():
        pytest.fail(f"the JupyterLab extension is not built ({BUILT}): run ./dev setup")
    root, config, settings, work, runtime, exts = (
        tmp / d for d in ("root", "config", "settings", "workspaces", "runtime", "labextensions")
    )
    for d in (root, config, settings, work, runtime, exts):
        d.mkdir(parents=True)
    write_notebook(root / NOTEBOOK, cells)
    (exts / "flash-jupyter").symlink_to(BUILT)
    # No news or update toasts over the screenshots.
    notif = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    token = secrets.token_hex(16)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASH_JUPYTER_")}
    env |= {
        **flash_env,
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(work),
    }
    args = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", "--ServerApp.jpserver_extensions=flash_jupyter=True",
        f"--LabApp.extra_labextensions_path={exts}", "--LabApp.news_url=None",
        "--LabApp.expose_app_in_browser=True",
    ]  # fmt: skip
    if os.geteuid() == 0:
        args.append("--allow-root")
    log_path = tmp / "lab.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    lab = Lab(f"http://127.0.0.1:{port}", token, root, log_path, proc)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"jupyter lab exited ({proc.returncode}):\n{lab.log()}")
        try:
            r = httpx.get(f"{lab.url}/api/status", params={"token": token}, timeout=2)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"jupyter lab did not answer:\n{lab.log()}")
        time.sleep(0.1)
    return lab


def stop_lab(lab: Lab) -> None:
    if lab.proc.poll() is None:
        lab.proc.terminate()
        try:
            lab.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.proc.kill()
            lab.proc.wait()


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


@pytest.fixture
def open_lab(tmp_path: Path, capsys) -> Iterator:
    """A factory: start Lab with a notebook of ``cells`` and open it in Chromium; the page
    and ``shot(name)`` (a screenshot, copied to SCREENSHOTS at the end)."""
    labs: list[Lab] = []
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)

        def factory(flash_env: dict[str, str], cells: list[str]):
            lab = start_lab(tmp_path / f"lab{len(labs)}", flash_env, cells)
            labs.append(lab)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("pageerror", lambda e: print("page error:", e))
            frames = open(tmp_path / "events.log", "a")  # what the panel heard, for a failure

            def on_socket(ws) -> None:
                if "flash-jupyter/api/events" in ws.url:
                    ws.on("framereceived", lambda f: frames.write(f"{time.time():.3f} {f}\n"))

            page.on("websocket", on_socket)
            page.goto(f"{lab.url}/lab/tree/{NOTEBOOK}?reset&token={lab.token}")
            wait_js(page, """() => {
                const app = window.jupyterapp;
                const w = app && app.shell.currentWidget;
                const k = w && w.context && w.context.path === 'flash.ipynb' &&
                          w.sessionContext.session && w.sessionContext.session.kernel;
                return k && k.status === 'idle';
            }""", timeout=90, what="the notebook and its kernel")  # fmt: skip
            page.evaluate(RECORDER)

            def shot(name: str) -> None:
                page.screenshot(path=str(shots / f"{name}.png"))

            return page, shot

        try:
            yield factory
        finally:
            browser.close()
            for lab in labs:
                stop_lab(lab)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            for png in shots.glob("*.png"):
                shutil.copy(png, SCREENSHOTS / png.name)
            if any(shots.glob("*.png")):
                with capsys.disabled():
                    print(f"\nsidebar screenshots: {SCREENSHOTS} (this run: {shots})")


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
