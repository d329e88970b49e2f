"""The search config: pydantic models for the YAML file, its loading and ``--set`` overrides.

This module is the bottom of the import layers: it knows the *shape* of a config (types,
ranges, names; pydantic validators), and nothing about models, tasks or spaces, so every
other module can import it and it imports none of them. Checks that need the disk or a
plug-in (model folders, lm-eval tasks, layer counts) are run once per command by
``evomerge.search.plan.plan_search``, which calls the module that owns each resource. Both
kinds of failure are one line naming the field and the fix, before any Ray work starts.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from evomerge.errors import ConfigError, read_utf8

#: Parameters a search space may search, with the meaning mergekit gives them.
SEARCHABLE_PARAMS = ("weight", "density", "epsilon", "gamma", "scale", "t", "lambda", "select_topk", "r", "alpha")

#: The widest ``space.bounds`` each parameter may have, and why: bounds outside these
#: are almost always a typo (a missing decimal point) and would waste the whole budget
#: on merges that cannot work.
PARAM_RANGES: dict[str, tuple[float, float, str]] = {
    "weight": (-10.0, 10.0, "beyond that a merge is numerically meaningless"),
    "density": (0.0, 1.0, "it is the fraction of each task vector kept"),
    "epsilon": (0.0, 1.0, "it spreads DELLA's keep probabilities around density, a fraction"),
    "gamma": (0.0, 1.0, "it is the fraction of largest magnitudes breadcrumbs drops"),
    "scale": (-10.0, 10.0, "it multiplies passthrough's one input; beyond that a merge is numerically meaningless"),
    "t": (0.0, 100.0, "it is slerp's interpolation fraction (0-1) or nearswap's distance threshold"),
    "lambda": (0.0, 10.0, "it scales the merged task vector; beyond that a merge is numerically meaningless"),
    "select_topk": (0.0, 1.0, "it is the fraction of positions SCE keeps"),
    "r": (0.0, 10.0, "it is RAM+'s amplification per unit of shared/unique ratio"),
    "alpha": (0.0, 10.0, "it caps the shared/unique ratio RAM+ amplifies by"),
}

#: A run name becomes the folder ``runs/<name>``: one plain path component.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _no_bool(value: Any) -> Any:
    """Refuse YAML ``true``/``false`` where a number is meant.

    pydantic's lax mode turns ``True`` into ``1``: ``budget.evaluations: true`` would run
    one evaluation, and ``ray.actors: yes`` one actor, without a word. A bool here is a
    mistake (often an unquoted ``yes``/``on``), so say so.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}; write a number (YAML reads "
                         f"yes/no/on/off/true/false as booleans)")
    return value


#: Integer / float fields that must not silently accept a bool.
Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]


def _same_source(ref: str) -> str:
    """A source reference normalised so that spellings of one folder compare equal.

    ``models/demo/sort``, ``models/demo/sort/`` and ``./models/demo/sort`` name the same
    model (and so does its absolute path); listing it twice would merge it with itself and
    bias every search. Distinct hub ids stay distinct.
    """
    return os.path.abspath(os.path.expanduser(ref.strip()))


class _Strict(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelsConfig(_Strict):
    """Which models to merge. Paths are local HF folders or hub ids."""

    base: str | None = Field(None, description="Base model the sources were fine-tuned from.")
    sources: list[str] = Field(..., min_length=1, description="Fine-tuned models to merge.")
    tokenizer_source: str | None = Field(
        None, description="Model whose tokenizer the merge uses; required if vocabularies differ."
    )
    allow_pickle: bool = Field(False, description="Allow .bin/.pt checkpoints (unsafe: pickle).")
    trust_remote_code: bool = False
    revision: str | None = None

    @field_validator("sources")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        seen: dict[str, str] = {}
        for ref in v:
            key = _same_source(ref)
            if key in seen:
                same = f"{ref!r} is" if seen[key] == ref else f"{seen[key]!r} and {ref!r} are the same model"
                raise ValueError(f"{same} listed twice; list each source once")
            seen[key] = ref
        return v


class MergeConfig(_Strict):
    """Which merge methods the search may choose, and how tensors are computed."""

    methods: list[str] = Field(default_factory=lambda: ["ties", "dare_ties", "task_arithmetic"], min_length=1)
    method_gene: Literal["global", "per_group"] = Field(
        "global", description="One method for the whole model, or one per layer group."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compute_dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    params: dict[str, float | bool] = Field(
        default_factory=dict, description="Fixed method-level parameters (normalize, rescale, lambda, ...)."
    )
    seed: Int = Field(0, description="Seed of DARE/DELLA masks, combined with each tensor's name.")
    fused: bool | None = Field(
        None, description="Merge task_arithmetic/ties/dare/breadcrumbs tensors with the compiled one-pass kernel "
        "(same bits, faster; compiles on each actor's first candidate). null: on for CPU actors whose "
        "task vectors hold >= 2**24 elements.",
    )


class SpaceConfig(_Strict):
    """How a vector of numbers becomes a merge recipe."""

    name: str = "layerwise"
    layer_group_size: Int = Field(1, ge=1)
    split: list[Literal["attn", "mlp", "norm"]] = Field(default_factory=list)
    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"weight": (0.0, 1.5), "density": (0.1, 1.0)}
    )
    init: str | None = Field(None, description="'uniform' (default), or a recipe JSON / mergekit YAML to start from.")
    # -- the dataflow space (search_spaces/dataflow.py) --------------------------------------
    repeats: Int = Field(1, description="dataflow: how many times the models' layers are laid out in slots.")
    scaling: Literal["auto", "transition", "slot"] = Field(
        "auto", description="dataflow: one hidden-state scale per layer-to-layer transition (the paper's M x M "
        "matrix), or per slot; auto: transition up to 32 layers in all, slot beyond.")
    scale_bounds: tuple[float, float] = Field((0.5, 2.0), description="dataflow: range of the scale genes.")
    max_path_length: Int | None = Field(None, description="dataflow: the most layers a path may have.")
    fixed_ends: Int = Field(0, ge=0, description="dataflow: pin the first and last k layers of the path to "
                            "embed_from's own.")
    embed_from: str | None = Field(None, description="dataflow: the source whose embeddings, final norm and "
                                   "head the path uses (default: the first source).")
    #: Kept so that configs (and run dirs' frozen config.yaml) that carry the empty ``options: {}``
    #: earlier versions wrote still load; no space takes an option.
    options: dict[str, Any] = Field(default_factory=dict, description="Unused: must stay empty.")

    @field_validator("options")
    @classmethod
    def _no_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v:
            raise ValueError(f"{next(iter(v))!r}: no search space takes options; remove space.options")
        return v

    @field_validator("repeats")
    @classmethod
    def _repeats(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"repeats must be >= 1 (got {v}); it is how many times the models' layers are laid out")
        return v

    @field_validator("max_path_length")
    @classmethod
    def _max_path(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"max_path_length must be >= 1 (got {v}); leave it out for no limit")
        return v

    @field_validator("scale_bounds")
    @classmethod
    def _scale_bounds(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= 1.0 <= hi):
            raise ValueError(f"[{lo:g}, {hi:g}] must be finite with 0 < lower <= 1 <= upper (a scale only "
                             f"rescales the hidden state, and 1 keeps a model's own path reachable)")
        return v

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for key, (lo, hi) in v.items():
            if key not in SEARCHABLE_PARAMS:
                raise ValueError(f"unknown parameter {key!r}; use one of {', '.join(SEARCHABLE_PARAMS)}")
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{key}: bounds [{lo}, {hi}] are not finite numbers; give two finite numbers")
            if lo > hi:
                raise ValueError(f"{key}: lower bound {lo} > upper bound {hi}; swap them")
            low, high, why = PARAM_RANGES[key]
            if lo < low or hi > high:
                raise ValueError(f"{key}: bounds [{lo:g}, {hi:g}] leave the range [{low:g}, {high:g}] ({why}); "
                                 f"keep both bounds within it")
        return v


class ObjectiveComponent(_Strict):
    """One term of a weighted-sum objective."""

    task: str
    metric: str
    weight: float = 1.0


class ObjectiveConfig(_Strict):
    """One objective of the search: a single metric, or a weighted sum of several."""

    name: str
    evaluator: str = "lm_eval"
    task: str | None = None
    heldout_task: str | None = Field(None, description="Task scored on held-out items; default: <task>_heldout if it exists.")
    metric: str | None = None
    components: list[ObjectiveComponent] | None = None
    direction: Literal["maximize", "minimize"] | None = None
    limit: Int | None = None
    heldout_limit: int | Literal["all"] | None = Field(
        None, description='Items of the held-out re-score: a number, "all", or null for the same as limit.')
    num_fewshot: Int | None = None
    batch_size: int | str = 16
    apply_chat_template: bool = False
    gen_kwargs: dict[str, Any] | None = None
    files: list[str] | None = Field(None, description="perplexity: local text files.")
    max_tokens: Int | None = Field(None, description="perplexity: token budget.")
    seed: Int = Field(0, description="Seed of the subsample of items (same items for every candidate).")

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"limit must be > 0 (got {v}); leave it out to use every item")
        return v

    @field_validator("heldout_limit", mode="before")
    @classmethod
    def _heldout_limit_not_bool(cls, v: Any) -> Any:
        return _no_bool(v)  # here, not in the type: a union would bury the message under its member names

    @field_validator("heldout_limit")
    @classmethod
    def _heldout_limit(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v <= 0:
            raise ValueError(f'heldout_limit must be > 0 (got {v}); use "all" for every held-out item')
        return v

    @model_validator(mode="after")
    def _shape(self) -> "ObjectiveConfig":
        if self.evaluator == "lm_eval" and not self.task and not self.components:
            raise ValueError(f"objective {self.name!r} needs a task (or components)")
        if self.evaluator == "perplexity" and not self.files:
            raise ValueError(f"objective {self.name!r}: perplexity needs files: [path, ...]")
        return self


class OptimizerConfig(_Strict):
    """Any nevergrad optimizer by registry name; None picks a default by objective count."""

    name: str | None = None
    seed: Int = 0
    popsize: Int | None = Field(None, ge=1, description="Default: number of actors.")


class BudgetConfig(_Strict):
    evaluations: Int | None = Field(None, gt=0)
    wall_clock_s: Float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some(self) -> "BudgetConfig":
        if self.evaluations is None and self.wall_clock_s is None:
            raise ValueError("set evaluations and/or wall_clock_s (both > 0)")
        return self


class RayConfig(_Strict):
    address: str | None = None
    actors: Int | None = Field(None, ge=1, description="Default: one per GPU of the cluster; on CPU one per "
                               "num_cpus_per_actor CPUs of a joined cluster, 1 for the embedded local Ray.")
    num_cpus_per_actor: Float = Field(1.0, gt=0)
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them.")
    object_store_memory: Int | None = Field(None, description="Bytes, for the embedded local Ray.")
    max_restarts: Int = Field(3, ge=0)
    eval_timeout_s: Float | None = Field(None, gt=0)
    task_vectors_on: Literal["device", "host"] = Field(
        "device", description="Kept for older configs: 'host' is memory_mode 'host' on GPU actors.")
    memory_mode: Literal["auto", "resident_sorted", "resident", "host", "streaming"] = Field(
        "auto", description="Where each actor keeps the task vectors; auto: the fastest that fits "
        "(evomerge.merge.memory_plan).")
    actor_memory_gb: Float | None = Field(
        None, gt=0, description="Memory one actor may use (GPU memory on GPU actors, host memory on CPU); "
        "default: what is free when it starts. Also requested from Ray, so actors are not packed too tight.")
    eval_headroom_gb: Float = Field(1.0, ge=0, description="Memory kept free for evaluation (activations).")
    placement: Literal["spread", "pack"] = Field(
        "spread", description="spread: actors on as many nodes as possible (Ray's SPREAD strategy); "
        "pack: Ray's default policy, which fills a node before it uses the next.")
    capacity_wait_s: Float = Field(
        600.0, gt=0, description="How long the search waits for a node that can host an actor when none is "
        "left, before it checkpoints and exits.")


class OutputConfig(_Strict):
    run_dir: str | None = None
    checkpoint_every: Int = Field(10, ge=1)
    save_front_weights: bool = False


class FidelityConfig(_Strict):
    """Multi-fidelity promotion: screen every candidate on a few items, score in full only those that
    could still enter the Pareto front (``evomerge.search.fidelity``)."""

    screen_items: Int = Field(16, ge=1, description="Items per objective a candidate is screened on: a fixed "
                              "subset of the selection items (or the IRT anchors), the same for every candidate.")
    min_probability: Float = Field(0.1, gt=0, le=1, description="A screened candidate is scored in full when the "
                                   "probability that its full scores would not be dominated by the current front is "
                                   "at least this.")
    margin: Float = Field(0.0, ge=0, description="Entering the front counts only by more than this on some "
                          "objective (epsilon-dominance, in the objective's units): 0 promotes any candidate that "
                          "could enter it at all.")
    confidence: Float = Field(0.9, gt=0, lt=1, description="Level of the interval a screen's estimate is shown with.")


class IrtConfig(_Strict):
    """Item response theory anchors (``evaluation.estimator: irt``, ``evomerge.irt``)."""

    calibration: Int = Field(32, ge=2, description="Candidates scored in full before the IRT model is fitted "
                             "(with the references) and the anchors are chosen.")


class EvaluationConfig(_Strict):
    include_paths: list[str] = Field(default_factory=list, description="Extra lm-eval task folders.")
    rescore_heldout: bool = True
    cache: bool = True
    fidelity: FidelityConfig | None = Field(None, description="Screen candidates on a few items first; "
                                            "null (default): every candidate is scored on every item.")
    estimator: Literal["subset", "irt"] = Field(
        "subset", description="How a screen becomes an estimate: the mean over a fixed random subset, or an IRT "
        "model's estimate from anchor items (needs fidelity).")
    irt: IrtConfig = Field(default_factory=IrtConfig)
    record_items: bool = Field(False, description="Log every candidate's per-item selection values (always on "
                               "when screening): the item-response data a later analysis needs.")

    @model_validator(mode="after")
    def _irt_needs_fidelity(self) -> "EvaluationConfig":
        if self.estimator == "irt" and self.fidelity is None:
            raise ValueError("estimator irt scores candidates on anchor items, which is a screen; add "
                             "fidelity: {screen_items: 16} (or use estimator: subset)")
        return self

    @property
    def wants_items(self) -> bool:
        """True when candidates' per-item selection values are logged."""
        return self.record_items or self.fidelity is not None


class SearchConfig(_Strict):
    """The whole search. ``name`` names the run; the sections are those of the README's config."""

    name: str = "search"
    models: ModelsConfig
    merge: MergeConfig = Field(default_factory=MergeConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    objectives: list[ObjectiveConfig] = Field(..., min_length=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    budget: BudgetConfig
    ray: RayConfig = Field(default_factory=RayConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # the name becomes runs/<name>: a '/' or '..' would write the run somewhere else
        if not _PLAIN_NAME.fullmatch(v) or ".." in v or not v.strip("."):
            raise ValueError(f"{v!r} is not a plain name (it becomes the folder runs/<name>); use only letters, "
                             f"digits, '-', '_' and '.', with no '/' and no '..'")
        return v

    @model_validator(mode="after")
    def _names(self) -> "SearchConfig":
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError("objective names must be unique")
        return self

    def resolved_run_dir(self) -> Path:
        return Path(self.output.run_dir or f"runs/{self.name}")


def _one_line(err: ValidationError) -> str:
    """Turn pydantic's multi-line report into one line: field path, problem, fix."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "<top level>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling against the README's config section"
    elif first["type"] == "missing":
        msg = "required field is missing; add it"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"config field {where}: {msg}{more}"


def _list_index(assignment: str, where: str, items: list[Any], part: str) -> int:
    """``part`` as an index into the list at ``where``, or a one-line ConfigError saying which indices exist."""
    n = len(items)
    valid = f"{n} entr{'y' if n == 1 else 'ies'} (use an index from 0 to {n - 1})" if n else "no entries"
    if not part.isdigit():  # also refuses "-1": counting from the end is too easy to misread
        raise ConfigError(f"--set {assignment!r}: {where} is a list, so {part!r} must be a number; "
                          f"{where} has {valid}")
    i = int(part)
    if i >= n:
        raise ConfigError(f"--set {assignment!r}: {where} has {valid}, so index {i} does not exist; "
                          f"add the entry in the config file")
    return i


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.path=value`` (value parsed as YAML) to the raw config dict.

    Every way the path can miss the config (a word where a list index goes, an index past
    the end, a key under a plain value) and a value that is not YAML is one ConfigError
    naming the override, so a typo on the command line never ends in a traceback.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: {key.strip()!r} is not a key path; write it like "
                          f"budget.evaluations=50")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise ConfigError(f"--set {assignment!r}: the value {raw!r} is not valid YAML ({problem}); "
                          f"quote it or close its brackets") from None
    except Exception as err:  # noqa: BLE001 - PyYAML's constructors raise ValueError/AttributeError/...
        # for a bad date, `!!int abc`, `!!timestamp y`, a 5000-digit integer: user text, so one line
        raise ConfigError(f"--set {assignment!r}: the value {raw!r} cannot be read ({' '.join(str(err).split())}); "
                          f"quote it to pass it as text") from None
    node: Any = data
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the config"
        last = depth == len(parts) - 1
        if isinstance(node, list):
            i = _list_index(assignment, where, node, part)
            if last:
                node[i] = value
            else:
                node = node[i]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {assignment!r}: {where} is a single value ({node!r}), not a section, so it "
                              f"has no key {part!r}; set {where}=VALUE itself")


def parse_config(data: dict[str, Any], overrides: list[str] | None = None) -> SearchConfig:
    """Validate a raw config dict (after ``--set`` overrides) into a SearchConfig."""
    data = copy.deepcopy(data)
    for assignment in overrides or []:
        _apply_override(data, assignment)
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass the path of a YAML config")
    text = read_utf8(p, ConfigError)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {str(err).splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001 - PyYAML's constructors raise ValueError/AttributeError/...
        # for a bad date, `!!int abc`, `!!timestamp y`, a 5000-digit integer: user text, so one line
        raise ConfigError(f"config file {p}: a value cannot be read ({' '.join(str(err).split())}); quote it to pass it "
                          f"as text") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping at the top level")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> SearchConfig:
    """Read and validate a config file (after ``--set`` overrides); resources are checked by the plan."""
    return parse_config(read_yaml(path), overrides)
