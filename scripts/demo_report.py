#!/usr/bin/env python
"""Did the demo search beat its baselines? Prints, from a run dir, the held-out table of the
references (base, each source, uniform average) and the front members that beat the uniform
average on every objective, with their mean, against the best source's mean.

    .venv/bin/python scripts/demo_report.py runs/demo
"""

from __future__ import annotations

import sys
from pathlib import Path

from evomerge.runview import load_run


def main(argv: list[str]) -> int:
    view = load_run(Path(argv[0] if argv else "runs/demo"))
    names = [o.name for o in view.objectives]
    mean = lambda s: sum(s[n] for n in names) / len(names)  # noqa: E731
    rows = {}
    for r in view.references:
        if r.heldout:
            rows[r.label] = r.heldout
    print("held-out exact match".ljust(28) + "".join(n.rjust(9) for n in names) + "mean".rjust(9))
    for label, s in rows.items():
        print(label.ljust(28) + "".join(f"{s[n]:9.3f}" for n in names) + f"{mean(s):9.3f}")
    uniform = rows.get("uniform")
    best_source = max((mean(s) for k, s in rows.items() if k.startswith("source:")), default=float("nan"))
    winners, scored = [], []
    for e in view.front_evaluations():
        held = view.heldout.get(e.id)
        if not held or uniform is None:
            continue
        scored.append((mean(held), e.id, held))
        if all(held[n] > uniform[n] for n in names) and mean(held) > best_source:
            winners.append((mean(held), e.id, held))
    print("\nfront members with the best held-out mean")
    for m, eid, held in sorted(scored, reverse=True)[:3]:
        print(eid.ljust(28) + "".join(f"{held[n]:9.3f}" for n in names) + f"{m:9.3f}")
    print(f"\nfront members beating the uniform average on every skill and every source on the mean "
          f"({best_source:.3f}), held-out: {len(winners)}")
    for m, eid, held in sorted(winners, reverse=True)[:5]:
        print(eid.ljust(28) + "".join(f"{held[n]:9.3f}" for n in names) + f"{m:9.3f}")
    return 0 if winners else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
