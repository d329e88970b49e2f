"""evomerge export: choosing a member, the exported folder, the model card, pushing.

The run directories are hand-made (tests/synthetic_run.py) with recipes over the tiny
random Llama set of conftest.py; no search, no Ray, no network. Hand-checked choices on
that table: knee = e000001, best add = e000002, best ppl (minimised) = e000006.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.export import (ExportError, best_member, choose_member, hub_base_models, knee_member, method_rows,
                             push_folder)
from evomerge.merge.recipe import MergeRecipe
from evomerge.runview import Objective, load_run
from synthetic_run import SCORES, write_run

OBJS = [Objective("add", "maximize"), Objective("ppl", "minimize")]
FRONT_PTS = {i: {"add": SCORES[i][0], "ppl": SCORES[i][1]} for i in ("e000001", "e000002", "e000003", "e000006")}
TOKEN = "hf_TESTsecretTOKENvalue0123456789"


# -- choosing (pure) ------------------------------------------------------------------------
def test_knee_and_best_by_hand() -> None:
    # normalised over the front (1 = best): e1 (0.5, 0.571) d=0.659; e3 (0.25, 0.857) d=0.764; e2, e6 d=1
    assert knee_member(FRONT_PTS, OBJS) == "e000001"
    assert best_member(FRONT_PTS, OBJS, "add") == "e000002"
    assert best_member(FRONT_PTS, OBJS, "ppl") == "e000006"  # minimised: the lowest


def test_best_tie_is_broken_by_the_knee() -> None:
    pts = {"a": {"add": 0.9, "ppl": 6.0}, "b": {"add": 0.9, "ppl": 3.0}, "c": {"add": 0.1, "ppl": 1.0}}
    assert best_member(pts, OBJS, "add") == "b"


def test_choose_member_errors_are_one_line(tmp_path: Path) -> None:
    view = load_run(write_run(tmp_path / "run"))
    assert choose_member(view, eval_id="e000005").id == "e000005"  # any successful evaluation, not only the front
    assert choose_member(view, knee=True).id == "e000001"
    assert choose_member(view, best="ppl").id == "e000006"
    for kwargs, text in [({"eval_id": "e000099"}, "no evaluation with that id"),
                         ({"eval_id": "e000004"}, "that evaluation failed"),
                         ({"best": "nope"}, "use one of: add, ppl")]:
        with pytest.raises(ExportError, match=text) as err:
            choose_member(view, **kwargs)
        assert "\n" not in str(err.value)


# -- model card pieces (pure) -----------------------------------------------------------------
def test_method_rows_collapse_runs_of_identical_groups() -> None:
    sp = lambda w: {"a": {"weight": w, "density": 0.5}}  # noqa: E731
    recipe = MergeRecipe.model_validate({"base": "b", "sources": ["a"], "groups": {
        "default": {"method": "ties", "source_params": sp(1.0)},
        "layers.2": {"method": "ties", "source_params": sp(0.25)},
        "layers.4": {"method": "dare_ties", "params": {"rescale": True}, "source_params": sp(1.0)}}})
    rows = method_rows(recipe, num_layers=6)
    assert rows == [
        ["embed, layers 0–1", "ties", "–", "density=0.5, weight=1"],
        ["layer 2", "ties", "–", "density=0.5, weight=0.25"],
        ["layer 3", "ties", "–", "density=0.5, weight=1"],
        ["layer 4", "dare_ties", "rescale=true", "density=0.5, weight=1"],
        ["layer 5, final_norm, lm_head", "ties", "–", "density=0.5, weight=1"],
    ]


def test_method_rows_with_split_layers_go_part_by_part() -> None:
    recipe = MergeRecipe.model_validate({"base": "b", "sources": ["a"], "groups": {
        "default": {"method": "linear", "source_params": {"a": {"weight": 1.0}}},
        "layers.0.attn": {"method": "ties", "source_params": {"a": {"weight": 0.5}}},
        "layers.1.attn": {"method": "ties", "source_params": {"a": {"weight": 0.5}}}}})
    assert [r[0] for r in method_rows(recipe, num_layers=3)] == [
        "embed", "layers 0–1 (attn)", "layer 2 (attn), layers 0–2 (mlp), layers 0–2 (norm), final_norm, lm_head"]


def test_hub_base_models_prefers_hub_ids(tmp_path: Path) -> None:
    local = tmp_path / "org" / "local"
    local.mkdir(parents=True)
    assert hub_base_models(["meta/llama", str(local), "models/x/y"]) == ["meta/llama"]
    assert hub_base_models([str(local)]) == [str(local)]  # all local: listed as given


# -- the exported folder ------------------------------------------------------------------------
def _recipes(tm) -> dict[str, dict[str, Any]]:
    base, srcs = tm.base_ref, tm.source_refs
    sp = lambda **kw: {s: {k: v[i] for k, v in kw.items()} for i, s in enumerate(srcs)}  # noqa: E731
    return {
        # knee: dare_ties, per-layer weights/densities, seeded masks
        "e000001": {"base": base, "sources": srcs, "seed": 1234, "groups": {
            "default": {"method": "dare_ties", "params": {},
                        "source_params": sp(weight=[0.6, 0.3, 0.5], density=[0.5, 0.7, 0.4])},
            "layers.1": {"method": "dare_ties", "params": {},
                         "source_params": sp(weight=[1.0, 0.2, 0.1], density=[0.3, 0.9, 0.6])}}},
        # best add: della, split attention/mlp genes
        "e000002": {"base": base, "sources": srcs, "seed": 99, "groups": {
            "default": {"method": "della", "params": {"lambda": 1.1},
                        "source_params": sp(weight=[0.5, 0.5, 0.5], density=[0.6, 0.5, 0.7], epsilon=[0.1, 0.1, 0.2])},
            "layers.2.attn": {"method": "della", "params": {"lambda": 0.9},
                              "source_params": sp(weight=[0.9, 0.1, 0.4], density=[0.4, 0.8, 0.5],
                                                  epsilon=[0.05, 0.1, 0.1])}}},
        # best ppl: two methods (a mergekit-multi YAML)
        "e000006": {"base": base, "sources": srcs, "seed": 5, "groups": {
            "default": {"method": "ties", "params": {},
                        "source_params": sp(weight=[0.4, 0.4, 0.4], density=[0.8, 0.6, 0.7])},
            "layers.3": {"method": "task_arithmetic", "params": {},
                         "source_params": sp(weight=[0.3, 0.6, 0.2])}}},
    }


@pytest.fixture(scope="module")
def run_dir(tiny_models, tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("export") / "run", recipes=_recipes(tiny_models),
                     base=tiny_models.base_ref, sources=tiny_models.source_refs)


@pytest.fixture(scope="module")
def knee_export(run_dir: Path) -> Path:
    out = run_dir.parent / "knee"
    assert main(["export", str(run_dir), "--knee", "--out", str(out), "--max-shard-size", "40KB"]) == 0
    return out


def _state(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _in_memory_merge(recipe: MergeRecipe, base_ref: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.merge.materialise import InPlaceMerger
    from evomerge.merge.sources import load_model_set

    model = AutoModelForCausalLM.from_pretrained(base_ref, dtype=torch.float32)
    ms = load_model_set(recipe.base, recipe.sources)
    InPlaceMerger(model, ms, device="cpu").apply(recipe)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_knee_folder_contents(knee_export: Path, run_dir: Path, tiny_models) -> None:
    names = {p.name for p in knee_export.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "recipe.json", "mergekit.yaml",
            "README.md", "report.png", "model.safetensors.index.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # 40KB shards
    index = json.loads((knee_export / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_state(knee_export))
    assert MergeRecipe.load(knee_export / "recipe.json").seed == 1234  # the knee's recipe (e000001)
    assert not [p for p in run_dir.parent.iterdir() if ".partial" in p.name]  # no temp dir left behind
    # mergekit.yaml names the models by the refs the user gave
    mk = (knee_export / "mergekit.yaml").read_text()
    for ref in [tiny_models.base_ref, *tiny_models.source_refs]:
        assert ref in mk


@pytest.mark.parametrize("pick,eid", [(["--knee"], "e000001"), (["--best", "add"], "e000002")])
def test_export_equals_in_memory_merge_bit_for_bit(pick, eid, knee_export, run_dir, tiny_models, tmp_path) -> None:
    """dare_ties (knee) and della (best add): seeded masks reproduce exactly at export."""
    import torch
    from transformers import AutoModelForCausalLM

    if eid == "e000001":
        out = knee_export
    else:
        out = tmp_path / "best"
        assert main(["export", str(run_dir), *pick, "--out", str(out)]) == 0
    recipe = MergeRecipe.load(out / "recipe.json")
    assert recipe.to_dict() == MergeRecipe.from_dict(_recipes(tiny_models)[eid]).to_dict()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    expected = _in_memory_merge(recipe, tiny_models.base_ref)
    files = _state(out)
    assert set(files) <= set(expected)
    for name, t in files.items():
        assert torch.equal(t, expected[name]), name
        assert torch.equal(loaded[name], expected[name]), name
    base = _state(tiny_models.base)
    assert any(not torch.equal(files[n], base[n]) for n in files)  # it really merged something


def test_mergekit_yaml_round_trip_gives_the_same_weights(knee_export: Path, run_dir: Path, tmp_path: Path) -> None:
    import torch

    multi = tmp_path / "multi"  # e000006 mixes ties and task_arithmetic: a mergekit-multi YAML
    assert main(["export", str(run_dir), "--best", "ppl", "--out", str(multi)]) == 0
    for folder in (knee_export, multi):
        again = tmp_path / f"again-{folder.name}"
        assert main(["merge", str(folder / "mergekit.yaml"), "--out", str(again)]) == 0
        a, b = _state(folder), _state(again)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_card(knee_export: Path, tiny_models) -> None:
    text = (knee_export / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "transformers"
    assert set(meta["tags"]) >= {"merge", "evomerge", "mergekit"}
    assert meta["base_model"] == [tiny_models.base_ref, *tiny_models.source_refs]  # local refs only: as given
    # method table: default dare_ties everywhere but layer 1 -> three rows
    assert "| embed, layer 0 | dare_ties |" in text
    assert "| layer 1 | dare_ties |" in text
    assert "| layers 2–3, final_norm, lm_head | dare_ties |" in text
    # scores of e000001 on selection (0.5, 4.0) and heldout (0.45, 4.2), and the references
    assert "| **this merge** (`e000001`) | 0.5 | 0.45 | 4 | 4.2 |" in text
    assert "| uniform average | 0.45 | 0.4 | 4.2 | 4.3 |" in text
    assert "| Tensors | Method | Parameters | `src0` | `src1` | `src2` |" in text
    assert "mergekit-yaml mergekit.yaml" in text and "DARE/DELLA" in text  # one method, random masks
    assert "![Pareto front of the search; this merge is circled](report.png)" in text
    for line in ("- optimizer: DE", "- seed: 7", "- budget: evaluations=20", "- evomerge version: 0.1.0"):
        assert line in text


def test_dtype_override(run_dir: Path, tmp_path: Path) -> None:
    import torch

    out = tmp_path / "bf16"
    assert main(["export", str(run_dir), "--id", "e000003", "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert MergeRecipe.load(out / "recipe.json").dtype == "bfloat16"
    assert {t.dtype for t in _state(out).values()} == {torch.bfloat16}


def test_existing_folder_is_refused(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), "--knee", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_out_under_an_existing_file_is_one_line(run_dir: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["export", str(run_dir), "--knee", "--out", str(blocker / "sub" / "model")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{blocker} is a file, not a folder" in err
    assert blocker.read_text() == "x"


def test_failure_leaves_no_half_folder(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import evomerge.export as export

    def boom(**kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "render_model_card", boom)
    out = tmp_path / "half"
    with pytest.raises(ExportError, match="disk full.*nothing was written") as err:
        export.export_member(run_dir, out, knee=True)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temp sibling is gone too


# -- pushing -------------------------------------------------------------------------------------
class FakeApi:
    """Stands in for huggingface_hub.HfApi: records calls, sends nothing."""

    calls: list[tuple[str, dict[str, Any]]] = []
    fail_upload: Exception | None = None

    def __init__(self, token: str | None = None, **kw: Any) -> None:
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kw: Any) -> str:
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, **kw: Any) -> None:
        FakeApi.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw: Any) -> Any:
        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        FakeApi.calls.append(("upload_folder", {**kw, "files": files}))
        if FakeApi.fail_upload is not None:
            raise FakeApi.fail_upload
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls = []
    FakeApi.fail_upload = None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return FakeApi


def _no_token_anywhere(capsys, caplog) -> None:
    cap = capsys.readouterr()
    for text in (cap.out, cap.err, caplog.text):
        assert TOKEN not in text


def test_push_sends_the_folder_in_one_commit(fake_hub, run_dir, tmp_path, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "pushed"
    rc = main(["-v", "export", str(run_dir), "--knee", "--out", str(out), "--push-to-hub", "me/tiny-merge",
               "--private", "--revision", "dev", "--commit-message", "evomerge knee"])
    assert rc == 0
    kinds = [c[0] for c in fake_hub.calls]
    assert kinds == ["init", "create_repo", "create_branch", "upload_folder"]
    init, repo, branch, upload = (c[1] for c in fake_hub.calls)
    assert init["token"] == TOKEN  # from HF_TOKEN, handed to HfApi only
    assert repo == {"repo_id": "me/tiny-merge", "private": True, "exist_ok": True, "repo_type": "model"}
    assert branch["repo_id"] == "me/tiny-merge" and branch["branch"] == "dev" and branch["exist_ok"] is True
    assert upload["repo_id"] == "me/tiny-merge" and upload["revision"] == "dev"
    assert upload["commit_message"] == "evomerge knee" and Path(upload["folder_path"]) == out
    assert upload["files"] == sorted(p.name for p in out.iterdir())
    assert {"README.md", "recipe.json", "mergekit.yaml", "config.json", "report.png"} <= set(upload["files"])
    assert "\n# tiny-merge\n" in (out / "README.md").read_text()  # the card is titled after the repo
    _no_token_anywhere(capsys, caplog)


def test_bad_repo_id_fails_before_the_merge(fake_hub, run_dir, tmp_path, capsys) -> None:
    out = tmp_path / "never"
    assert main(["export", str(run_dir), "--knee", "--out", str(out), "--push-to-hub", "not a repo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "OWNER/NAME" in err and "\n" not in err
    assert not out.exists() and fake_hub.calls == []


def test_push_without_branch_and_public(fake_hub, knee_export) -> None:
    url = push_folder(knee_export, "me/x")
    assert url.endswith("/commit/abc")
    assert [c[0] for c in fake_hub.calls] == ["init", "create_repo", "upload_folder"]
    assert fake_hub.calls[1][1]["private"] is False and fake_hub.calls[2][1]["revision"] is None


def test_missing_token_is_one_line_and_keeps_the_folder(fake_hub, run_dir, tmp_path, monkeypatch, capsys) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "kept"
    assert main(["export", str(run_dir), "--knee", "--out", str(out), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no Hugging Face token" in err and "\n" not in err and str(out) in err
    assert (out / "README.md").is_file() and list(out.glob("*.safetensors"))
    assert [c[0] for c in fake_hub.calls] == []  # nothing was attempted


def _http_error(status: int, message: str):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    req = httpx2.Request("POST", "https://huggingface.co/api/models/me/x/commit/main")
    return HfHubHTTPError(message, response=httpx2.Response(status, request=req))


@pytest.mark.parametrize("error,text", [
    (lambda: _http_error(403, f"Forbidden: token {TOKEN} cannot write"), "no write access to me/x (HTTP 403)"),
    (lambda: _http_error(401, "Unauthorized"), "no write access to me/x (HTTP 401)"),
    (lambda: ConnectionError(f"connection reset while sending Authorization: Bearer {TOKEN}"),
     "could not upload the folder (ConnectionError"),
])
def test_failing_upload_is_one_line_scrubbed_and_keeps_the_folder(error, text, fake_hub, knee_export, capsys,
                                                                   caplog) -> None:
    fake_hub.fail_upload = error()
    before = sorted(p.name for p in knee_export.iterdir())
    with pytest.raises(EvomergeError) as err:
        push_folder(knee_export, "me/x")
    msg = str(err.value)
    assert text in msg and "\n" not in msg and TOKEN not in msg and "is kept" in msg
    assert sorted(p.name for p in knee_export.iterdir()) == before
    _no_token_anywhere(capsys, caplog)
