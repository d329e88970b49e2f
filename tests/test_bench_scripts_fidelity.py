"""bench_quality.py's cost accounting of screening runs, and bench_irt.py's offline analysis, on synthetic logs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


def _ev(eid, *, measured=True, screen_items=None, promoted=False, cached_from=None, ok=True, items=None,
        reuse=None):
    screen = None if screen_items is None else {"n_items": screen_items, "promoted": promoted}
    if reuse is not None:
        screen["reuse"] = reuse
    return SimpleNamespace(id=eid, ok=ok, measured=measured, screen=screen, cached_from=cached_from, items=items)


def test_item_stats_counts_screens_full_evaluations_and_nothing_for_cache_hits():
    from bench_quality import item_stats

    view = SimpleNamespace(config={"objectives": [{"limit": 128}, {"limit": 128}]}, evaluations=[
        _ev("a"),  # calibration / full fidelity: 256
        _ev("b", measured=False, screen_items=32),  # screened, not promoted: 32
        _ev("c", screen_items=32, promoted=True),  # promoted: 32 + 256
        _ev("d", measured=False, screen_items=32, cached_from="b"),  # duplicate: free, not a candidate
        _ev("e", cached_from="a"),
        _ev("f", screen_items=32, promoted=True, reuse=True),  # promoted, screen reused: 256 in all
        _ev("g", measured=False, screen_items=32, reuse=True),  # not promoted: 32
    ])
    st = item_stats(view)
    assert st["spent"] == 256 + 32 + 32 + 256 + 256 + 32
    assert st["candidates"] == 5 and st["measured"] == 3
    assert (st["screened"], st["promoted"]) == (4, 2)
    assert st["per_candidate"] == st["spent"] / 5


def test_fidelity_bound_counts_candidates_entering_the_front_exactly_and_by_a_margin():
    from fidelity_bound import entry_shares

    rows = [SimpleNamespace(id=i, scores={"a": a, "b": b}) for i, (a, b) in enumerate(
        [(0.5, 0.5), (0.6, 0.4), (0.51, 0.49), (0.4, 0.4), (0.7, 0.7)])]
    shares = entry_shares(rows, {"a": "maximize", "b": "maximize"}, [0.0, 0.02])
    # exactly: 0, 1 and 2 are not dominated when they come, 3 is, 4 is; by 0.02: 2 is within 0.02 of 0
    assert shares == {0.0: 4 / 5, 0.02: 3 / 5}


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
