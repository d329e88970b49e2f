"""bench_quality.py's cost accounting of screening runs, and bench_irt.py's offline analysis, on synthetic logs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


def _ev(eid, *, measured=True, screen_items=None, promoted=False, cached_from=None, ok=True, items=None):
    screen = None if screen_items is None else {"n_items": screen_items, "promoted": promoted}
    return SimpleNamespace(id=eid, ok=ok, measured=measured, screen=screen, cached_from=cached_from, items=items)


def test_item_stats_counts_screens_full_evaluations_and_nothing_for_cache_hits():
    from bench_quality import item_stats

    view = SimpleNamespace(config={"objectives": [{"limit": 128}, {"limit": 128}]}, evaluations=[
        _ev("a"),  # calibration / full fidelity: 256
        _ev("b", measured=False, screen_items=32),  # screened, not promoted: 32
        _ev("c", screen_items=32, promoted=True),  # promoted: 32 + 256
        _ev("d", measured=False, screen_items=32, cached_from="b"),  # duplicate: free, not a candidate
        _ev("e", cached_from="a"),
    ])
    st = item_stats(view)
    assert st["spent"] == 256 + 32 + 32 + 256
    assert st["candidates"] == 3 and st["measured"] == 2
    assert (st["screened"], st["promoted"]) == (2, 1)
    assert st["per_candidate"] == st["spent"] / 3


def test_search_wall_s_leaves_out_the_heldout_rescoring(tmp_path):
    from bench_quality import search_wall_s

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "counters.json").write_text(json.dumps({"elapsed_s": 100.0}))
    recs = [{"kind": "reference", "label": "u", "finished_at": 1000.0},
            {"kind": "evaluation", "id": "e1", "finished_at": 1050.0},
            {"kind": "evaluation", "id": "e2", "finished_at": 1070.0},
            {"kind": "heldout", "id": "e2", "finished_at": 1090.0}]
    (tmp_path / "evaluations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert search_wall_s(tmp_path) == 80.0


def test_bench_irt_analysis_on_synthetic_responses():
    from bench_irt import analyse

    rng = np.random.default_rng(0)
    n_items, names = 64, ["x", "y"]
    difficulty = rng.normal(0, 1, n_items)

    def items(theta):
        return {n: [float(v) for v in (rng.random(n_items) < 1 / (1 + np.exp(-(theta - difficulty))))]
                for n in names}

    refs = [SimpleNamespace(ok=True, items=items(t)) for t in (-1.0, 0.0, 1.0)]
    evs = [SimpleNamespace(id=f"e{i}", ok=True, measured=True, cached_from=None, items=items(rng.normal()))
           for i in range(40)]
    evs.append(SimpleNamespace(id="dup", ok=True, measured=True, cached_from="e0", items=None))
    view = SimpleNamespace(references=refs, evaluations=evs, path="synthetic")
    cfg = SimpleNamespace(objectives=[SimpleNamespace(name=n, limit=n_items, seed=0) for n in names])
    res = analyse(view, cfg, k=8, calibration=20, confidence=0.9, seed=0, min_later=20)
    assert res["n"] == 20 and res["n_refs"] == 3
    for r in [*res["objectives"].values(), res["overall"]]:
        for key in ("irt", "fixed", "fresh"):
            mae, lo, hi = r[f"mae_{key}"]
            assert 0 <= lo <= mae <= hi <= 1
        assert 0 <= r["coverage"] <= 1
    assert all(len(r["anchors"]) == 8 for r in res["objectives"].values())
