"""User input that used to pass or end in a traceback: each is now one exact line, before Ray.

- ``--set key.path=value`` overrides that do not fit the config's shape;
- config values pydantic accepted but a search cannot use: non-finite or absurd
  ``space.bounds``, booleans where numbers go, run names that are paths, one source
  spelled two ways;
- config files, run-dir configs and recipes that are not UTF-8.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

import evomerge.search.ray_cluster as ray_cluster
from evomerge.cli import main
from evomerge.config import load_config, parse_config
from evomerge.errors import ConfigError, RunDirError
from evomerge.rundir import RunDir

BASE_CFG: dict[str, Any] = {
    "name": "t",
    "models": {"base": "b", "sources": ["x", "y"]},
    "objectives": [{"name": "o", "task": "demo_add", "metric": "exact_match"},
                   {"name": "p", "evaluator": "perplexity", "files": ["x.txt"]}],
    "budget": {"evaluations": 10},
}


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(BASE_CFG, list(overrides))
    return str(err.value)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> bool:
        raise AssertionError("Ray was started for a bad input")

    monkeypatch.setattr(ray_cluster, "init_ray", fail)


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


# -- --set overrides ---------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("objectives.x.limit=5",
     "--set 'objectives.x.limit=5': objectives is a list, so 'x' must be a number; objectives has 2 entries "
     "(use an index from 0 to 1)"),
    ("objectives.9.limit=5",
     "--set 'objectives.9.limit=5': objectives has 2 entries (use an index from 0 to 1), so index 9 does not "
     "exist; add the entry in the config file"),
    ("objectives.-1.limit=5",
     "--set 'objectives.-1.limit=5': objectives is a list, so '-1' must be a number; objectives has 2 entries "
     "(use an index from 0 to 1)"),
    ("models.sources.2=z",
     "--set 'models.sources.2=z': models.sources has 2 entries (use an index from 0 to 1), so index 2 does not "
     "exist; add the entry in the config file"),
    ("name.foo=1",
     "--set 'name.foo=1': name is a single value ('t'), not a section, so it has no key 'foo'; set name=VALUE "
     "itself"),
    ("budget.evaluations.x=1",
     "--set 'budget.evaluations.x=1': budget.evaluations is a single value (10), not a section, so it has no "
     "key 'x'; set budget.evaluations=VALUE itself"),
    ("budget.evaluations=[unclosed",
     "--set 'budget.evaluations=[unclosed': the value '[unclosed' is not valid YAML (while parsing a flow "
     "sequence); quote it or close its brackets"),
    ("budget..evaluations=1",
     "--set 'budget..evaluations=1': 'budget..evaluations' is not a key path; write it like "
     "budget.evaluations=50"),
    ("budget.evaluations", "--set 'budget.evaluations': expected key.path=value"),
])
def test_override_that_does_not_fit_is_one_line(override: str, message: str) -> None:
    assert _error(override) == message


def test_override_errors_reach_the_cli_as_one_line(tmp_path: Path, no_ray: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(BASE_CFG))
    assert _cli_error(["search", str(path), "--set", "objectives.9.limit=5"], capsys) == (
        "evomerge search: error: --set 'objectives.9.limit=5': objectives has 2 entries (use an index from 0 to 1), "
        "so index 9 does not exist; add the entry in the config file")
    assert not (tmp_path / "runs").exists()


def test_overrides_that_fit_still_apply() -> None:
    cfg = parse_config(BASE_CFG, ["objectives.1.max_tokens=500", "models.sources.0=z", "objectives.0.limit=5"])
    assert cfg.objectives[1].max_tokens == 500 and cfg.models.sources == ["z", "y"]
    assert cfg.objectives[0].limit == 5


# -- config values ---------------------------------------------------------------------------

_RANGE = "keep both bounds within it"


@pytest.mark.parametrize("bounds, message", [
    ("{weight: [.nan, 1]}", "weight: bounds [nan, 1.0] are not finite numbers; give two finite numbers"),
    ("{density: [0.1, .inf]}", "density: bounds [0.1, inf] are not finite numbers; give two finite numbers"),
    ("{weight: [-.inf, 1]}", "weight: bounds [-inf, 1.0] are not finite numbers; give two finite numbers"),
    ("{weight: [0, 20]}",
     f"weight: bounds [0, 20] leave the range [-10, 10] (beyond that a merge is numerically meaningless); {_RANGE}"),
    ("{weight: [-15, 1]}",
     f"weight: bounds [-15, 1] leave the range [-10, 10] (beyond that a merge is numerically meaningless); {_RANGE}"),
    ("{density: [0.1, 1.5]}",
     f"density: bounds [0.1, 1.5] leave the range [0, 1] (it is the fraction of each task vector kept); {_RANGE}"),
    ("{epsilon: [0, 2]}",
     f"epsilon: bounds [0, 2] leave the range [0, 1] (it spreads DELLA's keep probabilities around density, a "
     f"fraction); {_RANGE}"),
    ("{gamma: [-0.1, 0.5]}",
     f"gamma: bounds [-0.1, 0.5] leave the range [0, 1] (it is the fraction of largest magnitudes breadcrumbs "
     f"drops); {_RANGE}"),
    ("{t: [0.2, 120]}",
     f"t: bounds [0.2, 120] leave the range [0, 100] (it is slerp's interpolation fraction (0-1) or nearswap's "
     f"distance threshold); {_RANGE}"),
    ("{lambda: [0.5, 11]}",
     f"lambda: bounds [0.5, 11] leave the range [0, 10] (it scales the merged task vector; beyond that a merge "
     f"is numerically meaningless); {_RANGE}"),
])
def test_bounds_must_be_finite_and_sane(bounds: str, message: str) -> None:
    assert _error(f"space.bounds={bounds}") == f"config field space.bounds: {message}"


def test_bounds_at_the_edges_of_their_ranges_pass() -> None:
    bounds = "{weight: [-10, 10], density: [0, 1], epsilon: [0, 1], gamma: [0, 1], t: [0, 1], lambda: [0, 10]}"
    cfg = parse_config(BASE_CFG, [f"space.bounds={bounds}"])
    assert cfg.space.bounds == {"weight": (-10.0, 10.0), "density": (0.0, 1.0), "epsilon": (0.0, 1.0),
                                "gamma": (0.0, 1.0), "t": (0.0, 1.0), "lambda": (0.0, 10.0)}


_NOT_BOOL = "expected a number, got {}; write a number (YAML reads yes/no/on/off/true/false as booleans)"


@pytest.mark.parametrize("override, field, shown", [
    ("budget.evaluations=true", "budget.evaluations", "true"),
    ("budget.wall_clock_s=yes", "budget.wall_clock_s", "true"),
    ("ray.actors=on", "ray.actors", "true"),
    ("objectives.0.limit=true", "objectives.0.limit", "true"),
    ("objectives.0.heldout_limit=false", "objectives.0.heldout_limit", "false"),
    ("output.checkpoint_every=true", "output.checkpoint_every", "true"),
    ("space.layer_group_size=true", "space.layer_group_size", "true"),
])
def test_a_bool_is_not_a_number(override: str, field: str, shown: str) -> None:
    assert _error(override) == f"config field {field}: {_NOT_BOOL.format(shown)}"


def test_bool_budget_in_a_config_file_fails_before_ray(tmp_path: Path, no_ray: None,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE_CFG, "budget": {"evaluations": True}}))
    assert _cli_error(["search", str(path)], capsys) == (
        f"evomerge search: error: config field budget.evaluations: {_NOT_BOOL.format('true')}")
    assert parse_config(BASE_CFG, ["budget.evaluations=25"]).budget.evaluations == 25  # numbers still pass


_NAME = ("is not a plain name (it becomes the folder runs/<name>); use only letters, digits, '-', '_' and '.', "
         "with no '/' and no '..'")


@pytest.mark.parametrize("name", ["a/b", "../escape", "..", ".", "runs/demo", "/abs", "a..b", "with space", ""])
def test_name_must_be_a_plain_name(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE_CFG, "name": name})
    assert str(err.value) == f"config field name: {name!r} {_NAME}"


@pytest.mark.parametrize("name", ["demo", "demo-seed1", "run_2.v3", "A.b-c_9"])
def test_plain_names_pass(name: str) -> None:
    assert str(parse_config({**BASE_CFG, "name": name}).resolved_run_dir()) == f"runs/{name}"


@pytest.mark.parametrize("sources, first, second", [
    (["models/demo/sort", "models/demo/sort/"], "models/demo/sort", "models/demo/sort/"),
    (["models/demo/sort", "models/demo/upper", "./models/demo/sort"], "models/demo/sort", "./models/demo/sort"),
    (["./models/demo/sort/", "models/demo//sort"], "./models/demo/sort/", "models/demo//sort"),
    (["models/demo/sort", os.path.join(os.getcwd(), "models/demo/sort")], "models/demo/sort",
     os.path.join(os.getcwd(), "models/demo/sort")),
])
def test_one_source_spelled_two_ways_is_listed_twice(sources: list[str], first: str, second: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE_CFG, "models": {"sources": sources}})
    assert str(err.value) == (f"config field models.sources: {first!r} and {second!r} are the same model listed "
                              f"twice; list each source once")


def test_distinct_sources_pass() -> None:
    cfg = parse_config({**BASE_CFG, "models": {"sources": ["org/sort", "org/upper", "models/demo/sort"]}})
    assert cfg.models.sources == ["org/sort", "org/upper", "models/demo/sort"]


# -- text files that are not UTF-8 -------------------------------------------------------------

LATIN1 = "name: caf\u00e9\n".encode("latin-1")  # byte 0xe9 at offset 9 on line 1
LATIN1_TAIL = " is not UTF-8 text; byte 0xe9 at line 1 (offset 9) cannot be decoded: re-save the file as UTF-8"


def test_config_file_not_utf8(tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(LATIN1)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}{LATIN1_TAIL}"
    assert _cli_error(["search", str(path)], capsys) == f"evomerge search: error: {path}{LATIN1_TAIL}"
    # a second line with the bad byte: the line number says where to look
    path.write_bytes(b"name: t\nmodels: {sources: [\xff]}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path} is not UTF-8 text; byte 0xff at line 2 (offset 27) cannot be decoded: "
                              f"re-save the file as UTF-8")


def test_config_file_with_a_utf8_bom_loads(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump({**BASE_CFG, "name": "bom"}).encode())
    assert load_config(path).name == "bom"


def test_run_dir_config_not_utf8(tmp_path: Path, no_ray: None, capsys: pytest.CaptureFixture[str]) -> None:
    run = RunDir(tmp_path / "run")
    run.create(parse_config(BASE_CFG))
    run.config_path.write_bytes(LATIN1)
    with pytest.raises(RunDirError) as err:
        run.load_config()
    assert str(err.value) == f"{run.config_path}{LATIN1_TAIL}"
    assert _cli_error(["resume", str(run.path)], capsys) == f"evomerge resume: error: {run.config_path}{LATIN1_TAIL}"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_recipe_not_utf8(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"recipe{suffix}"
    if suffix == ".json":
        text = json.dumps({"base": "b\u00e9", "sources": ["s"]}, ensure_ascii=False)
    else:
        text = "merge_method: linear # \u00e9\n"
    path.write_bytes(text.encode("latin-1"))
    offset = text.index("\u00e9")
    out = tmp_path / "out"
    assert _cli_error(["merge", str(path), "--out", str(out)], capsys) == (
        f"evomerge merge: error: {path} is not UTF-8 text; byte 0xe9 at line 1 (offset {offset}) cannot be "
        f"decoded: re-save the file as UTF-8")
    assert not out.exists()


def test_read_only_commands_on_a_run_dir_config_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """status, plot and export read config.yaml through the run view: one line, exit 2, no traceback."""
    from evomerge.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(b"name: r\nobjectives: [{name: a, task: t, metric: m}]\n# caf\xe9\n")
    (run / "evaluations.jsonl").write_text("")
    for argv in (["status", str(run)], ["plot", str(run)], ["export", str(run), "--knee", "--out", str(tmp_path / "o")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{run / 'config.yaml'} is not UTF-8 text; byte 0xe9 at line 3" in err
    assert not (tmp_path / "o").exists()


# -- pre-flight of files Ray would otherwise meet first ----------------------------------------------
def _search_cfg(tiny_models: Any, tmp_path: Path, **space: Any) -> Path:
    cfg = {"name": "pf", "models": {"base": str(tiny_models.base), "sources": [str(p) for p in tiny_models.sources]},
           "merge": {"methods": ["ties"]}, "space": {"name": "layerwise", "layer_group_size": 2, **space},
           "objectives": [{"name": "p", "evaluator": "perplexity", "files": [str(tmp_path / "t.txt")]}],
           "budget": {"evaluations": 2}, "output": {"run_dir": str(tmp_path / "run")}}
    (tmp_path / "t.txt").write_text("abc abc abc\n")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_space_init_naming_a_missing_file_fails_before_ray(tiny_models: Any, tmp_path: Path, no_ray: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = _search_cfg(tiny_models, tmp_path, init=str(tmp_path / "nope.json"))
    err = _cli_error(["search", str(path)], capsys)
    assert err.startswith("evomerge search: error: config field space.init (") and "does not exist" in err
    assert not (tmp_path / "run").exists()


def test_truncated_safetensors_source_is_named_before_ray(tiny_models: Any, tmp_path: Path, no_ray: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    src = tmp_path / "src_cut"
    shutil.copytree(tiny_models.sources[0], src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    path = _search_cfg(tiny_models, tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["models"]["sources"][0] = str(src)
    path.write_text(yaml.safe_dump(cfg))
    err = _cli_error(["search", str(path)], capsys)
    assert err == (f"evomerge search: error: {weights}: truncated safetensors file ({len(data) // 2} bytes, "
                   f"its header needs {len(data)}); re-download or re-save it")
    assert not (tmp_path / "run").exists()
