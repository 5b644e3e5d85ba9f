"""discover(): the endpoints of a .py file, a package folder and a notebook, read without
running them; settings that are not literals are problems naming their place and --set."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from flash_jupyter.app.discover import MISSING, discover, parse_overrides
from flash_jupyter.config import EndpointConfig, default_endpoint_name, settings_from_tokens
from flash_jupyter.magic_line import endpoint_for

APP = """\
import flash_jupyter as fj
from flash_jupyter import Endpoint as E
from flash_jupyter import Endpoint
GPU = "A100"
open({marker!r}, "w").write("ran")  # must never run

@E(gpu="A100", workers=(0, 3), dependencies=["numpy"])
def train(x: int, lr: float = 0.1, *rest, steps: int = 10, tag=GPU, **extra) -> float:
    return x

@fj.Endpoint("pred", gpu=GPU)
async def predict(batch: list[float]):
    return batch

@Endpoint(cpu="cpu3c-2-4", idle_timeout=5)
class Model:
    def __init__(self, size: int = 3):
        self.size = size

    def run(self, x: "list[int]"):
        return x

    @staticmethod
    def helper(y: int):
        return y

    def _private(self):
        pass

def plain(a):
    return a

wrapped = Endpoint(name="plainly", workers=2)(plain)
shared = fj.Endpoint(max_concurrency=4)

@shared
def first():
    pass

if __name__ == "__main__":
    @Endpoint
    def bare():
        pass
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def by_name(d) -> dict:
    return {e.name: e for e in d.endpoints}


def test_a_python_file(tmp_path):
    marker = tmp_path / "ran.txt"
    app = write(tmp_path / "app.py", APP.format(marker=str(marker)))
    d = discover(app)
    assert not marker.exists()  # read, never run
    found = by_name(d)
    assert set(found) == {"train", "Model", "plainly", "first"}  # pred: not a literal

    train = found["train"]
    assert (train.kind, train.qualname, train.module_name, train.file) == (
        "function", "train", None, app.resolve())  # fmt: skip
    assert train.line == 7 and train.cell_index is None and not train.is_async
    assert train.settings == {"gpu": "A100", "workers": (0, 3), "dependencies": ["numpy"]}
    assert train.config == EndpointConfig.build(
        "train", gpu="A100", workers=(0, 3), dependencies=["numpy"]
    )
    params = {p.name: p for p in train.params}
    assert list(params) == ["x", "lr", "rest", "steps", "tag", "extra"]
    assert (params["x"].annotation, params["x"].default, params["x"].required) == (
        "int", MISSING, True)  # fmt: skip
    assert (params["lr"].annotation, params["lr"].default, params["lr"].required) == (
        "float", 0.1, False)  # fmt: skip
    assert params["steps"].kind == "keyword_only" and params["steps"].default == 10
    # A default that is not a literal: not required, value unknown, its text kept.
    assert (params["tag"].default, params["tag"].default_source) == (MISSING, "GPU")
    assert params["tag"].required is False
    assert [params["rest"].kind, params["extra"].kind] == ["var_positional", "var_keyword"]

    model = found["Model"]
    assert model.kind == "class" and model.config.cpu == "cpu3c-2-4"
    assert model.config.idle_timeout == 5
    assert set(model.methods) == {"run", "helper"}  # public ones; self left out
    assert [(p.name, p.annotation) for p in model.methods["run"]] == [("x", '"list[int]"')]
    assert [p.name for p in model.methods["helper"]] == ["y"]  # a staticmethod keeps y
    assert [(p.name, p.default) for p in model.init] == [("size", 3)]

    plainly = found["plainly"]  # x = Endpoint(...)(fn)
    assert (plainly.qualname, plainly.config.workers_max, plainly.line) == ("plain", 2, 33)
    assert [p.name for p in plainly.params] == ["a"]
    first = found["first"]  # ep = Endpoint(...); @ep
    assert first.config.max_concurrency == 4 and first.name == "first"

    where = app.resolve()  # outside the working directory: shown whole
    assert d.problems == [
        f"{where}:11: gpu=GPU is not a literal: write the value in the decorator, or set it "
        "with --set pred.gpu=A100",
        f"{where}:41: @Endpoint needs parentheses: @Endpoint() or @Endpoint(gpu=...)",
    ]


def test_overrides_give_what_is_not_a_literal(tmp_path):
    app = write(tmp_path / "app.py", APP.format(marker=str(tmp_path / "m")))
    d = discover(app, parse_overrides(["pred.gpu=H100", "train.workers=1,2", "train.env=A=1"]))
    found = by_name(d)
    assert found["pred"].config.gpu == ("H100",) and found["pred"].is_async
    assert found["pred"].settings == {"gpu": "H100"}
    # --set wins over the decorator's own literal.
    assert (found["train"].config.workers_min, found["train"].config.workers_max) == (1, 2)
    assert found["train"].config.env == {"A": "1"}
    assert not any("not a literal" in p for p in d.problems)

    d = discover(app, parse_overrides(["nosuch.gpu=A100"]))
    assert any("no endpoint named 'nosuch'" in p for p in d.problems)


def test_bad_overrides_and_bad_settings_are_clear(tmp_path):
    import pytest

    from flash_jupyter.app.discover import OverrideError

    with pytest.raises(OverrideError, match=r"NAME\.setting=VALUE"):
        parse_overrides(["gpu=A100"])
    with pytest.raises(OverrideError, match="did you mean 'gpu'"):
        parse_overrides(["train.gpus=A100"])
    app = write(
        tmp_path / "bad.py",
        """\
        from flash_jupyter import Endpoint
        SETTINGS = {}

        @Endpoint(gpu="Z9000")
        def a(): pass

        @Endpoint(**SETTINGS)
        def b(): pass

        @Endpoint(name=NAME)
        def c(): pass
        """,
    )
    d = discover(app)
    assert d.endpoints == []
    text = "\n".join(d.problems)
    assert f"{app.resolve()}:4: endpoint 'a':" in text and "Z9000" in text
    assert "bad.py:7: **SETTINGS cannot be read without running the file" in text
    assert "bad.py:10: name=NAME is not a literal" in text and "--set c.name=" in text
    assert by_name(discover(app, {"c": {"name": "renamed"}}))["renamed"].qualname == "c"


def test_imports_decide_what_is_an_endpoint(tmp_path):
    app = write(
        tmp_path / "other.py",
        """\
        from runpod_flash import Endpoint   # someone else's Endpoint
        import flash_jupyter.endpoint

        @Endpoint(gpu="A100")
        def theirs(): pass

        @flash_jupyter.endpoint.Endpoint(workers=1)
        def ours(): pass

        def later():
            @flash_jupyter.Endpoint()
            def nested(): pass   # not importable from the module: not an endpoint
        """,
    )
    d = discover(app)
    assert [e.name for e in d.endpoints] == ["ours"] and d.problems == []


def test_a_package_folder(tmp_path):
    pkg = tmp_path / "myapp"
    write(pkg / "__init__.py", "")
    write(
        pkg / "models" / "__init__.py",
        """\
        from flash_jupyter import Endpoint

        @Endpoint(gpu="L4")
        def embed(text: str): return text
        """,
    )
    write(
        pkg / "models" / "llm.py",
        """\
        import flash_jupyter as fj

        @fj.Endpoint(name="generate", dependencies=["fjtinypkg"])
        def gen(prompt: str, n: int = 1): return prompt
        """,
    )
    write(pkg / ".hidden" / "x.py", "import flash_jupyter as fj\n@fj.Endpoint()\ndef h(): pass\n")
    write(pkg / "venv" / "pyvenv.cfg", "")
    write(
        pkg / "venv" / "lib" / "y.py", "import flash_jupyter as fj\n@fj.Endpoint()\ndef v(): pass\n"
    )
    write(pkg / "broken.py", "def (:\n")
    d = discover(pkg)
    found = by_name(d)
    assert set(found) == {"embed", "generate"}
    assert found["embed"].module_name == "myapp.models"
    assert found["generate"].module_name == "myapp.models.llm"
    assert found["generate"].qualname == "gen" and found["generate"].root == tmp_path.resolve()
    assert found["generate"].config.dependencies == ("fjtinypkg",)
    assert len(d.problems) == 1 and "broken.py:1: not valid Python" in d.problems[0]

    # A folder that is not a package: module names from the folder itself.
    plain = tmp_path / "scripts"
    write(plain / "a.py", "from flash_jupyter import Endpoint\n@Endpoint()\ndef a(): pass\n")
    (e,) = discover(plain).endpoints
    assert (e.module_name, e.root) == ("a", plain.resolve())


def notebook(path: Path, cells: list[str | tuple[str, str]]) -> Path:
    nb = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    for c in cells:
        kind, text = c if isinstance(c, tuple) else ("code", c)
        cell = {"cell_type": kind, "metadata": {}, "source": text.splitlines(keepends=True)}
        if kind == "code":
            cell.update(outputs=[], execution_count=None)
        nb["cells"].append(cell)
    path.write_text(json.dumps(nb))
    return path


def test_a_notebook(tmp_path):
    nb = notebook(tmp_path / "analysis.ipynb", [
        ("markdown", "# Analysis"),
        "%load_ext flash_jupyter\nimport flash_jupyter as fj\nGPU = 'A100'\n"
        "%flash config idle_timeout=9",
        "%%flash gpu=A100 workers=0,2\nx = 1\ny = x + 1",
        "%%flash\nz = 3",
        "%%flash gpu=$GPU\nq = 1",
        "!ls\n@fj.Endpoint(\n    workers=1,\n    gpu=GPU)\ndef f(a: int = 2):\n    return a\nf?",
        "%%time\n@fj.Endpoint(dependencies=['fjtinypkg'])\ndef g():\n    pass",
        "%%bash\necho @fj.Endpoint",
        "%%flash name=notebook deps=fjtinypkg\nw = 1",
    ])  # fmt: skip
    d = discover(nb)
    cells = [e for e in d.endpoints if e.kind == "cell"]
    assert [(e.cell_index, e.name) for e in cells] == [
        (2, default_endpoint_name({"gpu": "A100"})), (3, "notebook"), (8, "notebook")
    ]  # fmt: skip
    # The name the labserver and the magic give the same line (without the session defaults).
    assert cells[0].name == endpoint_for("%%flash gpu=A100 workers=0,2")[0]
    assert cells[0].source == "x = 1\ny = x + 1" and cells[0].line == 1
    assert cells[0].magic_line == "%%flash gpu=A100 workers=0,2"
    # %flash config defaults apply to later cells, as in the kernel.
    assert [e.config.idle_timeout for e in cells] == [9, 9, 9]
    assert cells[0].config.workers_max == 2 and cells[0].config.gpu == ("A100",)
    # A later cell on the same endpoint changes it, as %%flash settings do.
    assert cells[2].config.dependencies == ("fjtinypkg",)
    assert cells[2].settings == {"idle_timeout": 9.0, "dependencies": ["fjtinypkg"]}

    g = by_name(d)["g"]  # in a %%time cell
    assert (g.kind, g.cell_index, g.line, g.module_name) == ("function", 6, 2, None)
    assert "f" not in by_name(d)
    where = nb.resolve()
    assert d.problems == [
        f"{where} cell 5 line 1: gpu=$GPU is not a literal (the kernel expands $name and "
        "{expression} in a magic line): write the value in the %%flash line, or set it with "
        "--set notebook.gpu=A100",
        f"{where} cell 6 line 2: gpu=GPU is not a literal: write the value in the "
        "decorator, or set it with --set f.gpu=A100",
    ]

    d = discover(nb, parse_overrides(["f.gpu=L4", "notebook.gpu=A100"]))
    assert d.problems == []
    assert by_name(d)["f"].config.gpu == ("L4",) and by_name(d)["f"].config.workers_max == 1
    assert [e.cell_index for e in d.endpoints if e.kind == "cell"] == [2, 3, 4, 8]


def test_unreadable_inputs_are_problems(tmp_path):
    d = discover(tmp_path / "nope.py")
    assert d.problems and "no such file or folder" in d.problems[0]
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    assert "not a notebook" in discover(bad).problems[0]
    nb = notebook(tmp_path / "x.ipynb", ["%%flash workers=abc\nx = 1"])
    (p,) = discover(nb).problems
    assert p.startswith(f"{nb.resolve()} cell 1 line 1: %%flash: workers must be")


def test_the_magic_and_discover_agree_on_names():
    for tokens in (["gpu=A100"], ["env=A=1"], ["deps=x,y", "workers=3"], []):
        line = " ".join(["%%flash", *tokens])
        name, _ = endpoint_for(line)
        assert name == default_endpoint_name(settings_from_tokens(tokens))
