"""One list of endpoint settings (config.SETTINGS) and one list of environment variables
(envvars.VARS): what reads text, what validates, what changes, what names endpoints, and
that the docs and every entry point agree with the lists."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flash_jupyter import Endpoint, envvars
from flash_jupyter.config import (
    BY_NAME,
    DEFAULT_NAME,
    ENV_FIELDS,
    SETTINGS,
    EndpointConfig,
    Setting,
    WorkersTextError,
    default_endpoint_name,
    parse_workers_text,
    settings_from_tokens,
    settings_help,
)
from flash_jupyter.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
LIMIT = Setting("limit", None, "int", "bytes: bigger values stay on the worker", "limit=BYTES")


# ---------------------------------------------------------------- tokens (%%flash k=v)


def test_tokens_read_every_setting_by_its_name_and_aliases():
    s = settings_from_tokens(
        ["name=prep", "gpu=H100,A100", "gpu_count=2", "workers=0,2", "idle-timeout=30",
         "deps=torch,numpy", "system_dependencies=git", "env=A=1", "env=B=x=y",
         "timeout=12.5", "max_concurrency=4", "limit=1024"],
        extra=(LIMIT,),
    )  # fmt: skip
    assert s == {
        "name": "prep", "gpu": ["H100", "A100"], "gpu_count": 2, "workers": (0, 2),
        "idle_timeout": 30.0, "dependencies": ["torch", "numpy"],
        "system_dependencies": ["git"], "env": {"A": "1", "B": "x=y"},
        "execution_timeout": 12.5, "max_concurrency": 4, "limit": 1024,
    }  # fmt: skip
    assert settings_from_tokens(["gpu=A100"]) == {"gpu": "A100"}
    assert settings_from_tokens(["dependencies=a", "execution_timeout=none"]) == {
        "dependencies": ["a"],
        "execution_timeout": None,
    }
    assert settings_from_tokens(["workers=3"]) == {"workers": (0, 3)}
    # What the tokens give, build takes as it is.
    s.pop("limit")
    cfg = EndpointConfig.build(s.pop("name"), **s)
    assert cfg.gpu == ("H100", "A100") and cfg.workers_max == 2
    assert cfg.dependencies == ("torch", "numpy") and cfg.env == {"A": "1", "B": "x=y"}


@pytest.mark.parametrize(
    "token, words",
    [
        ("gpu_count=two", ["gpu_count", "'two'"]),
        ("max_concurrency=1.5", ["max_concurrency", "'1.5'"]),
        ("idle_timeout=soon", ["idle_timeout", "'soon'"]),
        ("timeout=later", ["execution_timeout", "'later'"]),
        ("workers=a,b", ["workers", "'a,b'"]),
        ("workers=1,2,3", ["workers", "'1,2,3'"]),
        ("workers=3,1", ["workers", "min"]),
        ("env=NOVALUE", ["env", "'NOVALUE'"]),
        ("env==x", ["env", "'=x'"]),
        ("limit=big", ["limit", "'big'"]),
        ("gpu", ["key=value", "'gpu'"]),
        ("gpus=A100", ["'gpus'", "did you mean 'gpu'?", "known:"]),
        ("idle=3", ["'idle'", "did you mean 'idle_timeout'?"]),
        ("colour=blue", ["'colour'", "known:", "workers"]),
    ],
)
def test_tokens_with_bad_values_raise_config_error_naming_the_key(token, words):
    with pytest.raises(ConfigError) as e:
        settings_from_tokens([token], extra=(LIMIT,))
    for w in words:
        assert w in str(e.value), (token, w, str(e.value))


def test_magic_only_keys_are_unknown_without_extra():
    with pytest.raises(ConfigError, match="'limit'"):
        settings_from_tokens(["limit=5"])


def test_help_lists_every_setting_and_alias():
    text = settings_help(extra=(LIMIT,))
    for s in SETTINGS:
        for key in (s.name, *s.aliases):
            assert key + "=" in text, (key, text)
    assert "workers=MIN,MAX" in text and "idle_timeout" in text and "limit=BYTES" in text
    assert len(settings_help(sep="\n").splitlines()) == len(SETTINGS)


# ---------------------------------------------------------------- one list, every entry point


def test_the_decorator_takes_exactly_the_settings_with_their_defaults():
    params = inspect.signature(Endpoint.__init__).parameters
    keywords = {n: p.default for n, p in params.items() if n != "self"}
    assert keywords == {s.name: s.default for s in SETTINGS}


def test_build_and_from_dict_take_exactly_the_settings():
    full = {s.name: s.default for s in SETTINGS if s.name != "name"}
    assert EndpointConfig.build("x", **full) == EndpointConfig.build("x")
    assert EndpointConfig.from_dict({"name": "x", **full}) == EndpointConfig.build("x")
    assert set(EndpointConfig("x").to_dict()) == (
        set(BY_NAME) - {"workers"} | {"workers_min", "workers_max"}
    )
    assert set(ENV_FIELDS) == {s.name for s in SETTINGS if s.env}
    with pytest.raises(ConfigError, match="did you mean 'gpu'"):
        EndpointConfig.build("x", gpus="A100")
    with pytest.raises(ConfigError, match=r"'deps' \(did you mean 'dependencies'\?\)"):
        EndpointConfig.from_dict({"name": "x", "deps": ["a"]})


def test_workers_text_is_read_one_way_everywhere():
    for text, pair in [("3", (0, 3)), ("0,2", (0, 2)), (" 1 , 4 ", (1, 4)), ("2:5", (2, 5))]:
        assert parse_workers_text(text) == pair
        assert settings_from_tokens([f"workers={text}"]) == {"workers": pair}
        cfg = EndpointConfig.build("x", workers=text)
        assert (cfg.workers_min, cfg.workers_max) == pair
    for text in ("", "a", "1,x", "1,2,3"):
        with pytest.raises(WorkersTextError, match="N or MIN,MAX"):
            parse_workers_text(text)
    for text in ("3,1", "0,0", "0,101", "-1"):
        with pytest.raises(ConfigError, match="workers") as e:
            parse_workers_text(text)
        assert not isinstance(e.value, WorkersTextError)


def _cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "FLASH_JUPYTER_HOME": str(home), **env}
    # A URL nothing listens on: whatever the command does, it never starts a control plane.
    full.setdefault("FLASH_JUPYTER_URL", "http://127.0.0.1:9")
    return subprocess.run([sys.executable, "-m", "flash_jupyter.cli", *args], env=full,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_scale_reads_workers_as_the_setting_does(tmp_path):
    """Checked before the CLI connects: text that is not a range exits 2 (cli.md), a range
    the control plane would refuse exits 1, with the same message as everywhere else."""
    r = _cli("scale", "ep", "two,three", home=tmp_path)
    assert r.returncode == 2 and "workers must be N or MIN,MAX, not 'two,three'" in r.stderr
    r = _cli("scale", "ep", "3,1", home=tmp_path)
    assert r.returncode == 1 and "workers min (3) must not exceed max (1)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- changes to a configuration


def test_changed_applies_only_the_settings_given():
    base = EndpointConfig.build(
        "longrun", gpu="A100", workers=(0, 2), idle_timeout=30, dependencies=["numpy"],
        env={"A": "1"}, execution_timeout=60, max_concurrency=2,
    )  # fmt: skip
    assert base.changed() is base
    c = base.changed(idle_timeout=5)
    assert c.idle_timeout == 5
    assert c.to_dict() == {**base.to_dict(), "idle_timeout": 5.0}
    assert c.env_hash == base.env_hash and c.config_hash != base.config_hash
    c = base.changed(workers="1,3")
    assert (c.workers_min, c.workers_max) == (1, 3) and c.gpu == ("A100",)
    assert base.changed(workers=4).workers_min == 0  # N means (0, N), as everywhere
    # Hardware: a new kind replaces the old one.
    c = base.changed(cpu="cpu3c-1-2")
    assert c.gpu == () and c.cpu == "cpu3c-1-2" and c.dependencies == ("numpy",)
    assert c.changed(gpu="h100").gpu == ("H100",) and c.changed(gpu="h100").cpu is None
    with pytest.raises(ConfigError, match="not both"):
        base.changed(gpu="L4", cpu="cpu3c-1-2")
    # Checked as build checks; the original stays as it was.
    with pytest.raises(ConfigError, match="idle_timeout"):
        base.changed(idle_timeout=0)
    with pytest.raises(ConfigError, match="did you mean 'workers'"):
        base.changed(worker=3)
    assert base.idle_timeout == 30
    # settings() is the configuration by the decorator's names.
    again = base.settings()
    assert EndpointConfig.build(again.pop("name"), **again) == base
    # Tokens of a later cell apply as changes.
    c = base.changed(**settings_from_tokens(["name=longrun", "idle_timeout=10"]))
    assert c.name == "longrun" and c.idle_timeout == 10 and c.workers_max == 2


def test_an_endpoint_view_gives_back_its_config_and_takes_changes(api, name):
    """What ``GET /v1/endpoints/NAME`` returns as ``config`` is a configuration again, with
    the same hash the control plane computed; a change of it deploys as an update."""
    r = api.put(f"/v1/endpoints/{name}", json={"gpu": ["L4", "A100"], "workers": [0, 2],
                                                "idle_timeout": 30, "env": {"K": "v"}})  # fmt: skip
    assert r.status_code == 200, r.text
    view = api.get(f"/v1/endpoints/{name}").json()
    cfg = EndpointConfig.from_dict(view["config"])
    assert cfg.config_hash == view["config_hash"] == r.json()["config_hash"]
    assert cfg.gpu == ("L4", "A100") and cfg.env == {"K": "v"}

    new = cfg.changed(idle_timeout=5)
    r = api.put(f"/v1/endpoints/{name}", json=new.to_dict())
    assert r.status_code == 200 and r.json()["action"] == "updated", r.text
    after = api.get(f"/v1/endpoints/{name}").json()["config"]
    assert after == {**view["config"], "idle_timeout": 5.0}
    # The same settings again: reused, nothing changes.
    assert api.put(f"/v1/endpoints/{name}", json=new.to_dict()).json()["action"] == "reused"


def test_http_deploy_with_a_bad_setting_is_400_naming_it(api, name):
    cases = [
        ({"dependencies": 5}, "dependencies"),
        ({"dependencies": [1]}, "dependencies"),
        ({"system_dependencies": {"a": 1}}, "system_dependencies"),
        ({"env": [1, 2]}, "env"),
        ({"env": "K=V"}, "env"),
        ({"gpu": 5}, "gpu"),
        ({"gpu": [5]}, "gpu"),
        ({"gpu": []}, None),  # normal form of "no GPU": allowed
        ({"cpu": 5}, "cpu"),
        ({"cpu": ["cpu3c-1-2"]}, "cpu"),
        ({"workers": "a"}, "workers"),
        ({"workers": [0, 1], "workers_max": 3}, "workers"),
        ({"workers_min": "0"}, "workers"),
        ({"execution_timeout": "soon"}, "execution_timeout"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"max_concurrency": 1001}, "max_concurrency"),
        ({"gpu_count": 1.0}, "gpu_count"),
        ({"gpus": "A100"}, "did you mean 'gpu'?"),
        ({"deps": ["a"]}, "did you mean 'dependencies'?"),
    ]
    for body, word in cases:
        r = api.put(f"/v1/endpoints/{name}", json=body)
        if word is None:
            assert r.status_code == 200, (body, r.text)
            api.delete(f"/v1/endpoints/{name}")
            continue
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert word in r.json()["error"], (body, r.json())
    assert api.get(f"/v1/endpoints/{name}").status_code == 404


# ---------------------------------------------------------------- default endpoint names


def test_default_names_follow_the_environment_and_nothing_else():
    assert default_endpoint_name({}) == DEFAULT_NAME
    # Scaling and keys that are not environment settings do not count.
    assert default_endpoint_name({"workers": (0, 3), "idle_timeout": 5, "limit": 9}) == "notebook"
    assert default_endpoint_name({"execution_timeout": 5, "name": "x"}) == "notebook"
    # Settings that build the default environment are the default endpoint.
    assert default_endpoint_name({"cpu": "cpu3c-2-4", "gpu_count": 1}) == "notebook"
    a100 = default_endpoint_name({"gpu": "A100"})
    assert re.fullmatch(r"notebook-[0-9a-f]{8}", a100), a100
    # The same environment however it is written: the same name.
    assert default_endpoint_name({"gpu": "a100 80gb", "workers": (0, 2)}) == a100
    assert default_endpoint_name(settings_from_tokens(["gpu=A100", "idle_timeout=9"])) == a100
    assert default_endpoint_name({"deps": ["x"]}) == default_endpoint_name({"dependencies": "x"})
    # Different environments: different names.
    variants = [
        {"gpu": "A100"}, {"gpu": "H100"}, {"gpu": ["H100", "A100"]},
        {"gpu": "A100", "gpu_count": 2}, {"cpu": "cpu3c-1-2"},
        {"dependencies": ["numpy"]}, {"dependencies": ["pandas"]},
        {"system_dependencies": ["git"]}, {"env": {"A": "1"}}, {"env": {"A": "2"}},
        {"max_concurrency": 4}, {},
    ]  # fmt: skip
    names = [default_endpoint_name(v) for v in variants]
    assert len(set(names)) == len(names), names
    # Bad settings are the same ConfigError as anywhere.
    with pytest.raises(ConfigError, match="gpu_count"):
        default_endpoint_name({"gpu_count": 99})


def test_default_names_are_stable_across_processes():
    here = [default_endpoint_name(s) for s in ({"gpu": "A100"}, {"env": {"A": "1"}})]
    code = (
        "import json; from flash_jupyter.config import default_endpoint_name as d; "
        "print(json.dumps([d({'gpu': 'A100'}), d({'env': {'A': '1'}})]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=120)  # fmt: skip
    assert json.loads(out.stdout) == here


# ---------------------------------------------------------------- environment variables


def _source_files() -> list[Path]:
    return sorted((ROOT / "flash_jupyter").rglob("*.py"))


def test_every_variable_the_code_names_is_listed_and_documented():
    named = set()
    for p in _source_files():
        named |= set(re.findall(r"\bFLASH_JUPYTER_[A-Z_]*[A-Z]\b", p.read_text()))
    listed = {v.name for v in envvars.VARS}
    assert named <= listed, named - listed
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert envvars.docs_table() in doc, "run: python -m flash_jupyter.envvars"
    for v in envvars.VARS:
        assert f"| `{v.name}` |" in doc


# Read directly by a module being split elsewhere (server/control.py -> lifecycle.py);
# it should read envvars.get("FLASH_JUPYTER_MAX_RETRIES"). No other may be added.
STILL_READ_DIRECTLY: set[str] = set()


def test_only_envvars_reads_the_environment_for_flash_jupyter_variables():
    reads = re.compile(r"(?:os\.environ(?:\.get|\.pop|\.setdefault)?\s*[\[(]|os\.getenv\()"
                       r"\s*['\"](FLASH_JUPYTER_\w+)")  # fmt: skip
    direct = {
        (str(p.relative_to(ROOT)), var)
        for p in _source_files()
        if p.name != "envvars.py"
        for var in reads.findall(p.read_text())
    }
    assert {var for _, var in direct} <= STILL_READ_DIRECTLY, direct


def test_typed_values_are_read_when_asked(monkeypatch):
    monkeypatch.delenv("FLASH_JUPYTER_MAX_WORKERS", raising=False)
    assert envvars.get("FLASH_JUPYTER_MAX_WORKERS") is None
    monkeypatch.setenv("FLASH_JUPYTER_MAX_WORKERS", " 12 ")
    assert envvars.get("FLASH_JUPYTER_MAX_WORKERS") == 12
    monkeypatch.setenv("FLASH_JUPYTER_MAX_WORKERS", "")
    assert envvars.get("FLASH_JUPYTER_MAX_WORKERS") is None
    monkeypatch.setenv("FLASH_JUPYTER_HELLO_TIMEOUT", "0.5")
    assert envvars.get("FLASH_JUPYTER_HELLO_TIMEOUT") == 0.5
    monkeypatch.delenv("FLASH_JUPYTER_IDLE_SHUTDOWN", raising=False)
    assert envvars.get("FLASH_JUPYTER_IDLE_SHUTDOWN") == 3600.0
    # Flags: empty or 0 is off, anything else on, unset the default.
    for raw, spare, strict in [(None, True, False), ("", False, False), ("0", False, False),
                               ("1", True, True), ("yes", True, True)]:  # fmt: skip
        for var in ("FLASH_JUPYTER_SPARE_WORKERS", "FLASH_JUPYTER_STRICT_GPU"):
            if raw is None:
                monkeypatch.delenv(var, raising=False)
            else:
                monkeypatch.setenv(var, raw)
        assert envvars.get("FLASH_JUPYTER_SPARE_WORKERS") is spare, raw
        assert envvars.get("FLASH_JUPYTER_STRICT_GPU") is strict, raw
    monkeypatch.setenv("FLASH_JUPYTER_URL", "")
    assert not envvars.is_set("FLASH_JUPYTER_URL") and envvars.get("FLASH_JUPYTER_URL") is None
    with pytest.raises(KeyError):
        envvars.get("FLASH_JUPYTER_NO_SUCH_THING")


@pytest.mark.parametrize(
    "var, raw",
    [
        ("FLASH_JUPYTER_MAX_WORKERS", "lots"),
        ("FLASH_JUPYTER_MAX_WORKERS", "0"),
        ("FLASH_JUPYTER_MAX_RETRIES", "-1"),
        ("FLASH_JUPYTER_HELLO_TIMEOUT", "nan"),
        ("FLASH_JUPYTER_MAX_FRAME_BYTES", "1.5"),
        ("FLASH_JUPYTER_IDLE_SHUTDOWN", "soon"),
        ("FLASH_JUPYTER_MAX_BODY_BYTES", "-5"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable(monkeypatch, var, raw):
    monkeypatch.setenv(var, raw)
    with pytest.raises(envvars.EnvVarError, match=rf"{var}={re.escape(repr(raw))} is not valid"):
        envvars.get(var)


def test_the_cli_reports_a_bad_variable_in_one_line(tmp_path):
    r = _cli("start", home=tmp_path, FLASH_JUPYTER_IDLE_SHUTDOWN="soon", FLASH_JUPYTER_URL="")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "FLASH_JUPYTER_IDLE_SHUTDOWN='soon'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runtime.json").exists()


def test_a_control_plane_with_a_bad_variable_says_which(tmp_path):
    env = {**os.environ, "FLASH_JUPYTER_MAX_WORKERS": "lots", "FLASH_JUPYTER_SPARE_WORKERS": "0"}
    env.pop("FLASH_JUPYTER_URL", None)
    r = subprocess.run(
        [sys.executable, "-m", "flash_jupyter.server", "--host", "127.0.0.1", "--port", "0",
         "--wire-port", "0", "--data-dir", str(tmp_path), "--exit-with-parent", str(os.getpid())],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert "FLASH_JUPYTER_MAX_WORKERS='lots' is not valid" in r.stderr, r.stderr[-2000:]
