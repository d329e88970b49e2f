"""A member of an earlier run as a model: ``runs/demo#e000002`` and ``runs/demo#knee``.

The run directory is written by hand with the project's own writers (``RunDir.create``,
``RunDir.append``, ``RunDir.write_front``), no search and no Ray. Its recipes merge the
tiny random Llamas of ``conftest.tiny_models``. Scores (``add`` maximized, ``ppl``
minimized), chosen so the front and the knee can be worked out by hand:

    id       add   ppl   front?
    e000000  0.2   5.0   no  (dominated by e000002)
    e000001  0.9   6.0   yes  best add
    e000002  0.6   4.0   yes  <- knee
    e000003  0.3   3.0   yes  best ppl
    e000004  failed
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import SourceError
from evomerge.merge import materialise
from evomerge.merge.materialise import merge_to_folder
from evomerge.merge.recipe import MergeRecipe
from evomerge.merge.run_member import PROVENANCE, member_folder, member_provenance, parse_member_ref
from evomerge.merge.sources import load_model_set, resolve_source, tokenizer_vocab
from evomerge.pareto import ParetoArchive
from evomerge.records import EvaluationRecord, HeldoutRecord, Status
from evomerge.rundir import RunDir

SCORES: dict[str, tuple[float, float] | None] = {
    "e000000": (0.2, 5.0),
    "e000001": (0.9, 6.0),
    "e000002": (0.6, 4.0),
    "e000003": (0.3, 3.0),
    "e000004": None,
}
DIRECTIONS = {"add": "maximize", "ppl": "minimize"}
HELDOUT = {"add": 0.55, "ppl": 4.2}


def _recipe(base: str, sources: list[str], w: float) -> dict[str, Any]:
    weights = [w, 1.0 - w, 0.25][: len(sources)]
    return {"base": base, "sources": sources, "seed": 3, "dtype": "float32", "compute_dtype": "float32",
            "groups": {"default": {"method": "ties", "params": {},
                                   "source_params": {s: {"weight": x, "density": 0.7}
                                                     for s, x in zip(sources, weights)}}}}


def _make_run(root: Path, tm, *, relative_e3: bool = False) -> Path:
    """config.yaml, evaluations.jsonl (5 evaluations, 1 held-out record) and front.json, via RunDir."""
    rd = RunDir(root)
    rd.create({"name": "upstream", "models": {"base": tm.base_ref, "sources": tm.source_refs,
                                              "allow_pickle": False, "revision": None}})
    archive = ParetoArchive(DIRECTIONS)
    recipes: dict[str, dict[str, Any]] = {}
    for k, (eid, sc) in enumerate(SCORES.items()):
        recipe = _recipe(tm.base_ref, tm.source_refs, 0.2 + 0.15 * k)
        if relative_e3 and eid == "e000003":  # relative to the cwd, as every ref in evomerge
            recipe = _recipe("base", ["src0", "src1", "src2"], 0.5)
        recipes[eid] = recipe
        if sc is None:
            rec = EvaluationRecord(id=eid, index=k, asked=k + 1, recipe=recipe, status=Status.FAILED,
                                   error="actor died")
        else:
            scores = {"add": sc[0], "ppl": sc[1]}
            rec = EvaluationRecord(id=eid, index=k, asked=k + 1, recipe=recipe, status=Status.OK, scores=scores,
                                   losses=[-sc[0], sc[1]])
            archive.add(eid, scores)
        rd.append(rec)
    rd.append(HeldoutRecord(id="e000002", status=Status.OK, scores=dict(HELDOUT)))
    rd.write_front(archive, recipes, {"e000002": HELDOUT}, evaluations=len(SCORES))
    return root


@pytest.fixture
def run(tiny_models, tmp_path, monkeypatch) -> str:
    """``runs/demo`` under a fresh cwd; the ref prefix as a user writes it."""
    monkeypatch.chdir(tmp_path)
    _make_run(tmp_path / "runs" / "demo", tiny_models)
    return "runs/demo"


@pytest.fixture
def merges(monkeypatch) -> list[Path]:
    """Every merge_to_folder call (run_member imports it at call time), still merging."""
    calls: list[Path] = []

    def counting(recipe, out_dir, **kw):
        calls.append(Path(out_dir))
        return merge_to_folder(recipe, out_dir, **kw)

    monkeypatch.setattr(materialise, "merge_to_folder", counting)
    return calls


def _record(run: str, eid: str) -> dict[str, Any]:
    return next(r for r in RunDir(run).read_records("evaluation") if r["id"] == eid)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- resolving -------------------------------------------------------------------------------
def test_member_resolves_to_the_merge_of_its_recipe_bit_for_bit(run, tmp_path, merges):
    src = resolve_source(f"{run}#e000002")
    assert src.ref == "runs/demo#e000002"  # recipes name models by the ref as written
    assert src.path == Path(run) / "members" / "e000002"
    assert len(merges) == 1 and merges[0].parent == Path(run) / "members"
    assert merges[0].name.startswith(f".e000002.tmp-{socket.gethostname()}-{os.getpid()}-")
    assert sorted(p.name for p in src.path.parent.iterdir()) == ["e000002"]  # temp renamed, nothing left over
    recipe = MergeRecipe.from_dict(_record(run, "e000002")["recipe"])
    direct = merge_to_folder(recipe, tmp_path / "direct")
    got, want = _tensors(src.path), _tensors(direct)
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert set(src.tensor_names()) == set(want)
    assert torch.equal(src.get_tensor("model.embed_tokens.weight"), want["model.embed_tokens.weight"])


def test_provenance_records_where_the_member_came_from(run):
    folder = member_folder(f"{run}#e000002")
    info = member_provenance(folder)
    rec = _record(run, "e000002")
    assert info == {"run_dir": "runs/demo", "id": "e000002", "recipe": rec["recipe"],
                    "recipe_hash": MergeRecipe.from_dict(rec["recipe"]).content_hash(),
                    "scores": {"add": 0.6, "ppl": 4.0}, "heldout": HELDOUT}
    assert member_provenance(folder / "nowhere") is None
    e1 = member_provenance(member_folder(f"{run}#e000001"))
    assert e1 is not None and e1["heldout"] is None and e1["scores"] == {"add": 0.9, "ppl": 6.0}


def test_knee_is_the_balanced_member_of_the_front_and_shares_its_folder(run, merges):
    # independently of evomerge.pareto: min-max normalise each objective over the front, 1 = best,
    # and take the member nearest the ideal (1, 1)
    front = {i: s for i, s in SCORES.items() if s is not None and i != "e000000"}
    add = {i: s[0] for i, s in front.items()}
    ppl = {i: -s[1] for i, s in front.items()}  # minimized: larger is better after the sign
    norm = lambda v, i: (v[i] - min(v.values())) / (max(v.values()) - min(v.values()))  # noqa: E731
    expected = min(front, key=lambda i: math.dist((norm(add, i), norm(ppl, i)), (1.0, 1.0)))
    assert expected == "e000002"  # neither extreme, nor the front's first member
    knee = resolve_source(f"{run}#knee")
    assert knee.ref == "runs/demo#knee" and knee.path == Path(run) / "members" / expected
    by_id = resolve_source(f"{run}#{expected}")
    assert by_id.path == knee.path and len(merges) == 1  # one folder for both names


def test_mean_is_the_best_selection_mean_of_the_front(run, merges):
    # add is maximized, ppl minimized: signed means e000001 (0.9-6)/2, e000002 (0.6-4)/2, e000003 (0.3-3)/2
    front = {i: s for i, s in SCORES.items() if s is not None and i != "e000000"}
    expected = max(front, key=lambda i: (front[i][0] - front[i][1]) / 2)
    assert expected == "e000003"
    assert member_folder(f"{run}#mean") == Path(run) / "members" / expected


def test_knee_follows_evaluations_logged_after_front_json(run):
    # a record after the last checkpoint that dominates the whole front: the front is recomputed from the log
    rec = EvaluationRecord(id="e000005", index=5, asked=6, recipe=_record(run, "e000003")["recipe"],
                           status=Status.OK, scores={"add": 0.95, "ppl": 2.0}, losses=[-0.95, 2.0])
    RunDir(run).append(rec)
    assert member_folder(f"{run}#knee") == Path(run) / "members" / "e000005"


def test_a_screen_estimate_logged_after_front_json_is_not_a_front_member(run):
    # the same dominating scores, but only estimated from a screen: the front is of measurements only
    from evomerge.records import Fidelity

    rec = EvaluationRecord(id="e000005", index=5, asked=6, recipe=_record(run, "e000003")["recipe"],
                           status=Status.OK, scores={"add": 0.95, "ppl": 2.0}, losses=[-0.95, 2.0],
                           fidelity=Fidelity.SCREEN, screen={"n_items": 8, "promoted": False})
    RunDir(run).append(rec)
    assert member_folder(f"{run}#knee") != Path(run) / "members" / "e000005"
    assert member_folder(f"{run}#mean") == Path(run) / "members" / "e000003"


def test_a_second_resolve_reuses_the_folder_without_merging(run, merges):
    first = resolve_source(f"{run}#e000001")
    weights = first.path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = resolve_source(f"{run}#e000001")
    assert again.path == first.path and len(merges) == 1
    assert weights.stat().st_mtime_ns == stamp


def test_a_folder_of_another_recipe_or_without_provenance_is_rebuilt(run, merges):
    folder = member_folder(f"{run}#e000001")
    info = member_provenance(folder)
    (folder / PROVENANCE).write_text('{"recipe_hash": "0000"}')  # as if built from another recipe
    assert member_folder(f"{run}#e000001") == folder and len(merges) == 2
    assert member_provenance(folder) == info
    (folder / PROVENANCE).unlink()  # a folder nobody vouches for
    assert member_folder(f"{run}#e000001") == folder and len(merges) == 3
    assert member_provenance(folder) == info


def test_a_stale_temp_folder_from_a_crash_is_not_trusted_and_is_cleaned(run, merges):
    members = Path(run) / "members"
    stale = members / f".e000002.tmp-{socket.gethostname()}-{_dead_pid()}-k3x9q"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # half a merge ...
    rec = _record(run, "e000002")  # ... that even got its provenance written before the crash
    (stale / PROVENANCE).write_text(
        '{"recipe_hash": "%s"}' % MergeRecipe.from_dict(rec["recipe"]).content_hash())
    other_host = members / ".e000002.tmp-some-other-node-1-ab12"  # may be live elsewhere: left alone
    other_host.mkdir()
    aside = members / f".e000002.old-{socket.gethostname()}-{_dead_pid()}-zz01"  # a crash while replacing
    aside.mkdir()
    folder = member_folder(f"{run}#e000002")
    assert len(merges) == 1 and folder == members / "e000002"
    assert (folder / "model.safetensors").is_file()
    assert not stale.exists() and not aside.exists() and other_host.exists()


def test_a_crash_during_the_merge_leaves_no_member_folder(run, monkeypatch):
    def dies(recipe, out_dir, **kw):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(materialise, "merge_to_folder", dies)
    with pytest.raises(KeyboardInterrupt):
        member_folder(f"{run}#e000002")
    members = Path(run) / "members"
    assert list(members.iterdir()) == []  # neither the member nor the temp folder


def test_relative_refs_in_the_member_recipe_are_relative_to_the_cwd(tiny_models, tmp_path, monkeypatch):
    run = _make_run(tmp_path / "runs" / "rel", tiny_models, relative_e3=True)
    monkeypatch.chdir(tiny_models.root)  # where "base", "src0", ... are
    folder = member_folder(f"{run}#e000003")
    assert member_provenance(folder)["recipe"]["base"] == "base"  # type: ignore[index]
    assert (folder / "model.safetensors").is_file()


def test_load_model_set_takes_member_refs_and_their_tokenizer(run, tiny_models):
    ms = load_model_set(None, [f"{run}#knee", tiny_models.source_refs[0]])
    member = ms.sources[0]
    assert member.ref == "runs/demo#knee" and member.path == Path(run) / "members" / "e000002"
    assert ms.tokenizer_path == member.path and tokenizer_vocab(member.path) == tokenizer_vocab(tiny_models.base)
    assert ms.by_ref("runs/demo#knee") is member
    with_base = load_model_set(tiny_models.base_ref, [f"{run}#e000001", f"{run}#e000002"])
    assert [s.ref for s in with_base.sources] == ["runs/demo#e000001", "runs/demo#e000002"]


# -- refs that are not members ------------------------------------------------------------------
def test_a_real_folder_named_with_a_hash_is_a_plain_folder(run, tiny_models):
    plain = Path(f"{run}#e000002")  # a model folder that happens to be called so, next to the run
    shutil.copytree(tiny_models.sources[0], plain)
    src = resolve_source(f"{run}#e000002")
    assert src.path == plain and not (Path(run) / "members").exists()
    other = Path("models/odd#name")
    shutil.copytree(tiny_models.sources[1], other)
    assert resolve_source("models/odd#name").path == other


def test_parse_member_ref(run, tmp_path):
    assert parse_member_ref(f"{run}#e000002") == (Path(run), "e000002")
    assert parse_member_ref(f"{run}#knee") == (Path(run), "knee")
    assert parse_member_ref(f"{tmp_path}/runs/demo#e12") == (tmp_path / "runs" / "demo", "e12")
    for ref in [run, f"{run}#best", f"{run}#", f"{run}#E000002", "#knee", "runs/nope#knee", "runs#knee",
                "org/model", f"{run}#e000002x"]:
        assert parse_member_ref(ref) is None, ref


@pytest.mark.parametrize("ref, words", [
    ("runs/nope#e000001", ["runs/nope#e000001", "run directory runs/nope does not exist"]),
    ("runs#e000001", ["runs#e000001", "not a run directory", "no evaluations.jsonl"]),
    ("runs/demo#e000999", ["runs/demo#e000999", "runs/demo has no evaluation e000999",
                           "use an id from `evomerge status runs/demo`"]),
    ("runs/demo#e000004", ["runs/demo#e000004", "evaluation e000004 of runs/demo failed (actor died)",
                           "evomerge status runs/demo"]),
    ("runs/demo#best", ["runs/demo#best", "'best'", "neither an evaluation id", "runs/demo#knee"]),
])
def test_bad_member_refs_are_one_line(run, ref, words):
    with pytest.raises(SourceError) as err:
        resolve_source(ref)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    assert not (Path(run) / "members").exists()  # nothing merged, nothing written


def test_knee_of_a_run_without_a_front_is_one_line(run):
    (Path(run) / "front.json").unlink()
    with pytest.raises(SourceError) as err:
        member_folder(f"{run}#knee")
    msg = str(err.value)
    assert "\n" not in msg and "runs/demo#knee" in msg and "front.json" in msg and "by id" in msg


# -- chaining: a data-flow run over a member, exported ----------------------------------------
def test_a_chained_export_is_a_plain_model_whose_card_records_both_recipes(run, tiny_models, tmp_path):
    """Parameter space, then data flow: the upstream member is a model of the path; its recipe is in the card."""
    from transformers import AutoModelForCausalLM

    from evomerge.export import export_member
    from evomerge.merge.path_recipe import PathRecipe, PathStep

    member, other = f"{run}#e000002", tiny_models.source_refs[0]
    path = PathRecipe(models=[member, other], embed_from=member,
                      path=[PathStep(model=member, layer=0), PathStep(model=other, layer=1, scale=1.25),
                            PathStep(model=member, layer=1, scale=0.8)])
    down = RunDir(tmp_path / "runs" / "chained")
    down.create({"name": "chained", "models": {"sources": [member, other], "allow_pickle": False, "revision": None},
                 "space": {"name": "dataflow"}})
    down.append(EvaluationRecord(id="e000000", index=0, asked=1, recipe=path.to_dict(), status=Status.OK,
                                 scores={"add": 0.7, "ppl": 3.5}, losses=[-0.7, 3.5]))
    archive = ParetoArchive(DIRECTIONS)
    archive.add("e000000", {"add": 0.7, "ppl": 3.5})
    down.write_front(archive, {"e000000": path.to_dict()}, {}, evaluations=1)
    out, chosen = export_member(down.path, tmp_path / "exported", eval_id="e000000")
    assert chosen.id == "e000000"
    card = (out / "README.md").read_text()
    upstream = MergeRecipe.from_dict(_record(run, "e000002")["recipe"])
    assert f"## Upstream merge: `{member}`" in card and "evaluation `e000002` of the run `runs/demo`" in card
    assert f'"method": "{upstream.groups["default"].method}"' in card and '"density": 0.7' in card
    assert "| 1 | `" + other + "` | 1 | 1.25 | 0.8 |" in card  # the folded factor 1 / 1.25
    assert PathRecipe.load(out / "recipe.json") == path
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 3 and not list(out.glob("*.py"))
