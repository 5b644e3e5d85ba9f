"""binder/postBuild, run as Binder would, in a fresh virtual environment made from this checkout;
then the quickstart notebook runs there, on the installed package.

Offline: the fresh environment sees this test's packages (JupyterLab, ipykernel, the build
backend) through a ``.pth`` file, the way Binder's image already has JupyterLab, and pip gets
``PIP_NO_INDEX`` and no build isolation, so postBuild installs flash-jupyter from the checkout
without downloading anything. The Lab extension must be built already (``./dev setup``): a
fresh clone's postBuild builds it with Node.js and the npm registry, which this test does not
exercise (Binder's own image build does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POSTBUILD = ROOT / "binder" / "postBuild"
BUILT = ROOT / "flash_jupyter" / "labextension_dist" / "package.json"

# Run by the fresh interpreter: the quickstart notebook, then a cell saying where it ran.
RUN_NOTEBOOK = r"""
import json, sys
import nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
nb.cells.append(nbformat.v4.new_code_cell(
    "import sys, flash_jupyter; print(sys.executable); print(flash_jupyter.__file__)"))
NotebookClient(nb, timeout=120, kernel_name="python3",
               resources={"metadata": {"path": sys.argv[2]}}).execute()
print(json.dumps("".join(o.get("text", "") for o in nb.cells[-1].outputs)))
"""


def fresh_venv(where: Path) -> Path:
    """A new venv whose site-packages also sees this interpreter's (after its own)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    py = where / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "_test_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def clean_env(venv: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JUPYTER_", "FLASH_JUPYTER_", "PIP_")) and k != "VIRTUAL_ENV"
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


@pytest.mark.timeout(400)
def test_postbuild_installs_and_quickstart_runs(tmp_path):
    if not BUILT.exists():
        pytest.skip("the JupyterLab extension is not built (./dev setup builds it)")
    for backend in ("hatchling", "hatch_jupyter_builder"):
        if importlib.util.find_spec(backend) is None:
            pytest.skip(f"{backend} is not installed here (the test extra brings it); without "
                        "it pip would download the build backend")  # fmt: skip
    venv = tmp_path / "venv"
    py = fresh_venv(venv)
    # The fresh venv has no flash-jupyter of its own yet.
    probe = [str(py), "-c", "import flash_jupyter; print(flash_jupyter.__file__)"]
    alone = subprocess.run(probe, cwd=tmp_path, capture_output=True, env=clean_env(venv))
    assert alone.returncode != 0, alone.stdout

    offline = clean_env(
        venv,
        PIP_NO_INDEX="1",
        PIP_NO_BUILD_ISOLATION="0",  # pip reads this switch inverted: 0 turns isolation off
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    run = subprocess.run(
        ["bash", str(POSTBUILD)], cwd=tmp_path, env=offline, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "installed with its JupyterLab and server extensions" in run.stdout

    # Installed into the fresh venv (not the checkout), with both Jupyter halves.
    where = subprocess.run(probe, cwd=tmp_path, capture_output=True, text=True, env=clean_env(venv))
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    assert (venv / "share/jupyter/labextensions/flash-jupyter/package.json").exists()
    assert (venv / "etc/jupyter/jupyter_server_config.d/flash_jupyter.json").exists()

    # The notebook a Binder launch opens runs there, on its own control plane.
    home = tmp_path / "home"
    env = clean_env(venv, FLASH_JUPYTER_HOME=str(home), FLASH_JUPYTER_RECEIPTS="0")
    try:
        nb = subprocess.run(
            [str(py), "-c", RUN_NOTEBOOK, str(ROOT / "notebooks" / "quickstart.ipynb"),
             str(tmp_path)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    finally:
        subprocess.run([str(py), "-m", "flash_jupyter.cli", "shutdown"], env=env,
                       capture_output=True, timeout=30)  # fmt: skip
    assert nb.returncode == 0, nb.stdout[-3000:] + nb.stderr[-3000:]
    executable, module = json.loads(nb.stdout.strip().splitlines()[-1]).split()[:2]
    assert executable.startswith(str(venv)), executable
    assert module.startswith(str(venv)), module
