"""Property-based fuzz of the config and its ``--set`` overrides: one line or a config, never a traceback.

Starting from a valid config (``BASE_CFG`` below, every section present), hypothesis
draws mutations — keys deleted at any depth, values swapped for another type (str, int,
float, bool, None, list, dict), numbers out of range (huge, negative, zero), NaN and
infinities, unicode text with control and non-BMP characters — and ``--set
key.path=value`` overrides whose paths mix real config keys with random segments and
list indices, and whose values are the same kinds of values rendered as YAML text, or
broken YAML. The properties:

- ``parse_config(data, overrides)`` returns a config or raises an ``EvomergeError`` whose
  message is one line; any other exception fails the test;
- ``evomerge search CONFIG --set ...`` on a YAML file (``run_search`` replaced by a no-op)
  returns 0 or 2, and on 2 writes exactly one line to stderr.

Ray must never start: ``ray.init`` and ``search.ray_cluster.init_ray`` raise if called.

Runs are derandomized (the same examples every run, so CI is reproducible), with no
deadline. ``MAX_EXAMPLES`` = 2000 per property: the whole file took 24 s (26 s wall with
pytest start-up) on the shared 2-core development machine; the CLI property is most of it.

A bug it found is pinned as its own test at the end (``test_yaml_whose_constructor_fails_is_one_line``):
YAML that PyYAML parses but whose constructor raises ``ValueError`` — a date that does not exist
(``2020-13-45``), ``!!int abc``, ``!!float x``, an integer of 5000 digits — escaped from ``--set``
and from the config file as a traceback; now one line. The generated YAML includes such text too.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import evomerge.cli.search_commands as commands
import evomerge.search.ray_cluster as ray_cluster
from evomerge.cli import main
from evomerge.config import parse_config
from evomerge.errors import EvomergeError

#: examples per property (see the module docstring for the time it takes)
MAX_EXAMPLES = 2000

FUZZ = settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])

BASE_CFG: dict[str, Any] = {
    "name": "t",
    "models": {"base": "b", "sources": ["x", "y"]},
    "merge": {"methods": ["ties", "task_arithmetic"], "method_gene": "global", "dtype": "float32",
              "params": {"normalize": True, "lambda": 1.0}, "seed": 0},
    "space": {"name": "layerwise", "layer_group_size": 2, "split": ["attn", "mlp"],
              "bounds": {"weight": [0.0, 1.5], "density": [0.1, 1.0]}, "options": {}},
    "objectives": [{"name": "o", "task": "demo_add", "metric": "exact_match", "limit": 5, "heldout_limit": "all"},
                   {"name": "p", "evaluator": "perplexity", "files": ["x.txt"], "max_tokens": 100}],
    "optimizer": {"name": "DE", "seed": 0, "popsize": 4},
    "budget": {"evaluations": 10, "wall_clock_s": 60.0},
    "ray": {"actors": 1, "num_cpus_per_actor": 0.5, "max_restarts": 3, "task_vectors_on": "device"},
    "output": {"run_dir": "unused-run-dir", "checkpoint_every": 5, "save_front_weights": False},
    "evaluation": {"include_paths": [], "rescore_heldout": True, "cache": True},
}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of ``node`` (dict keys and list indices), parents before children."""
    out: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append(prefix + (key,))
        out.extend(_paths(child, prefix + (key,)))
    return out


BASE_PATHS = _paths(BASE_CFG)
REAL_KEYS = sorted({str(p[-1]) for p in BASE_PATHS} | {"tokenizer_source", "allow_pickle", "components",
                                                       "direction", "address", "use_gpu", "init", "fused"})

# -- values ------------------------------------------------------------------------------------


texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # control + non-BMP
numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**100, 0.0, -0.0, 1e-300, 1e300, -1e300]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts,
                    st.sampled_from(["", "all", "ties", "DE", "perplexity", "..", "a/b", "~", "yes", "on"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(REAL_KEYS), texts), inner, max_size=3)), max_leaves=6)


def _as_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip()


BROKEN_YAML = ["[unclosed", "{a: ", "a: b: c", "'unterminated", "\"unterminated", "*alias", "&a [*a, ",
               "!!python/object/apply:os.system ['true']", "!!binary ~~~", "@x", "`x", "%TAG ! x", "{[1]: 2}",
               "- a\nb: c", "\t", "key: [1, 2", "? ", "!<tag:x> 1", "|\n bad\n  indent"]

yaml_text = st.one_of(
    values.map(_as_yaml),
    st.sampled_from(BROKEN_YAML),
    texts,
    st.sampled_from(["2020-13-45", "2001-02-30", "!!int abc", "!!float x", "!!timestamp y"]),
)

# -- mutations of the base config and overrides -----------------------------------------------

mutation = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(BASE_PATHS)),
    st.tuples(st.just("replace"), st.sampled_from(BASE_PATHS), values),
)


def _mutate(data: dict[str, Any], ops: list[tuple[Any, ...]]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for op in ops:
        path = op[1]
        node: Any = data
        for part in path[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        last = path[-1]
        if isinstance(node, dict) and last in node or isinstance(node, list) and isinstance(last, int) \
                and last < len(node):
            if op[0] == "delete":
                del node[last]
            else:
                node[last] = op[2]
    return data


segment = st.one_of(st.sampled_from(REAL_KEYS), st.integers(-2, 4).map(str),
                    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="="), max_size=6))
key_path = st.one_of(
    st.sampled_from(BASE_PATHS).map(lambda p: ".".join(str(x) for x in p)),
    st.lists(segment, min_size=1, max_size=4).map(".".join),
    st.tuples(st.sampled_from(BASE_PATHS), segment).map(lambda t: ".".join(str(x) for x in t[0]) + "." + t[1]),
)
override = st.one_of(
    st.tuples(key_path, yaml_text).map(lambda kv: f"{kv[0]}={kv[1]}"),
    key_path,  # no "="
    texts,
)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Ray was started while checking a config")

    monkeypatch.setattr(ray, "init", fail)
    monkeypatch.setattr(ray_cluster, "init_ray", fail)


def _check_parse(data: dict[str, Any], overrides: list[str]) -> None:
    try:
        cfg = parse_config(data, overrides)
    except EvomergeError as err:
        assert "\n" not in str(err), repr(str(err))
        return
    assert cfg.budget.evaluations is None or cfg.budget.evaluations > 0
    for lo, hi in cfg.space.bounds.values():  # validated bounds are finite and ordered
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi


@FUZZ
@given(ops=st.lists(mutation, max_size=4), overrides=st.lists(override, max_size=3))
@example(ops=[], overrides=[])
@example(ops=[("replace", ("space", "bounds", "weight"), [math.nan, math.inf])], overrides=["budget.evaluations=0"])
@example(ops=[("delete", ("models",))], overrides=["models.sources.0=x"])
@example(ops=[], overrides=["objectives.1.files=[\U0001f600\x85]", "name=\u202e\x07"])
def test_parse_config_returns_a_config_or_one_line(no_ray: None, ops: list[tuple[Any, ...]],
                                                    overrides: list[str]) -> None:
    _check_parse(_mutate(BASE_CFG, ops), overrides)


@FUZZ
@given(ops=st.lists(mutation, max_size=3), overrides=st.lists(override, max_size=2))
@example(ops=[], overrides=[])
@example(ops=[], overrides=["budget.evaluations=[unclosed"])
def test_search_cli_exits_0_or_2_with_one_line(no_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str], ops: list[tuple[Any, ...]],
                                               overrides: list[str]) -> None:
    monkeypatch.setattr(commands, "run_search", lambda *a, **k: 0)
    monkeypatch.chdir(tmp_path)  # a relative run_dir an override makes lands here, not in the repo
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_mutate(BASE_CFG, ops), allow_unicode=True), encoding="utf-8")
    # --set=VALUE, not --set VALUE: argparse reads a value starting with '-' as an option (usage + exit 2)
    argv = ["search", str(path)] + [f"--set={ov}" for ov in overrides]
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert err.count("\n") == 1 and err.endswith("\n"), repr(err)


# -- a bug the fuzz found ---------------------------------------------------------------------

# Found by this fuzz: PyYAML's SafeLoader *constructors* raise plain ValueError, not yaml.YAMLError, for a scalar that
# resolves to a date that does not exist (`2020-13-45`: "month must be in 1..12"), for an explicit
# `!!int` / `!!float` tag on a non-number ("invalid literal for int() with base 10: 'abc'"), and for an
# integer longer than Python's 4300-digit int() limit. `_apply_override` (--set) and `read_yaml` (the
# config file) caught only yaml.YAMLError, so the CLI ended in a ValueError traceback instead of one line.
BAD_YAML_SCALARS = ["2020-13-45", "2001-02-30", "!!int abc", "!!float x", "1" * 5000, "!!timestamp y"]


@pytest.mark.parametrize("where", ["override", "file"])
@pytest.mark.parametrize("value", BAD_YAML_SCALARS, ids=["month13", "feb30", "int_tag", "float_tag", "5000_digits", "timestamp_tag"])
def test_yaml_whose_constructor_fails_is_one_line(where: str, value: str, tmp_path: Path, no_ray: None,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(commands, "run_search", lambda *a, **k: 0)
    path = tmp_path / "cfg.yaml"
    text = yaml.safe_dump(BASE_CFG)
    if where == "file":
        text = text.replace("evaluations: 10", f"evaluations: {value}")
        assert value in text
    path.write_text(text)
    argv = ["search", str(path)] + (["--set", f"budget.evaluations={value}"] if where == "override" else [])
    if where == "override":
        with pytest.raises(EvomergeError):
            parse_config(BASE_CFG, [f"budget.evaluations={value}"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evomerge search: error: "), repr(err)
