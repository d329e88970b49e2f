"""Held-out re-scoring: front members scored on the split the search never saw.

A search chooses on the selection split; a claim about a merge is made on the held-out
split. This service runs those jobs over an ``EvaluatorPool`` and appends one
``HeldoutRecord`` per member (with per-item values when the evaluator gives them, for
paired intervals). Both the end of a search and ``evomerge status --rescore`` call it;
neither needs the optimizer, so a re-score never replays the log into one.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

from evomerge.records import HeldoutRecord, Kind, Status
from evomerge.rundir import RunDir
from evomerge.search.pool import EvaluatorPool, Job

log = logging.getLogger("evomerge.search")


def score_heldout(run: RunDir, pool: EvaluatorPool, recipes: Mapping[str, dict[str, Any]], *,
                  should_stop: Callable[[], bool] = lambda: False,
                  on_tick: Callable[[], None] = lambda: None) -> dict[str, HeldoutRecord]:
    """Score each ``{id: recipe}`` on the held-out split, append its record; the records by id.

    An interrupted batch returns what finished; a member whose scoring failed gets a
    failed record (logged, so ``status`` shows why) and is left out of the result.
    """
    jobs = [Job(Kind.HELDOUT, i, recipe, split="heldout") for i, recipe in recipes.items()]
    if not jobs:
        return {}
    results = pool.run_batch(jobs, should_stop=should_stop, on_tick=on_tick)
    out: dict[str, HeldoutRecord] = {}
    for i in recipes:
        res = results.get((Kind.HELDOUT.value, i, "heldout"))
        if res is None:
            continue
        rec = HeldoutRecord(id=i, status=Status(res["status"]), scores=res["scores"], error=res.get("error"),
                            items=res.get("items") or None, finished_at=time.time())
        run.append(rec)
        if rec.ok:
            out[i] = rec
        else:
            log.warning("heldout scoring of %s failed: %s", i, rec.error)
    return out
