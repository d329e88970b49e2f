#!/usr/bin/env python
"""The demo's verdict: did the search find a merge that simple merging does not?

    .venv/bin/python scripts/demo_report.py [runs/demo] [--rule mean|knee]

1. The member is chosen from the final front on the *selection* split only: the best
   selection mean (default) or the knee. Held-out scores never take part in the choice.
2. It is compared, on every held-out item (512 per skill in the demo), with the uniform
   average of the specialists and with each specialist: held-out means, and a 95% paired
   bootstrap interval (items paired, skills resampled separately) of each difference.
3. The claim: the chosen member beats the uniform average on the held-out mean with the whole
   interval of the difference above zero, and beats every specialist on the held-out mean.

Exit status 0 when the claim holds; 1, with one line saying which part failed, when it does
not; 2 when the run directory cannot be judged (no per-item held-out scores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evomerge.errors import RunDirError  # noqa: E402
from evomerge.records import UNIFORM, display_label, is_source_label, short_label  # noqa: E402
from evomerge.runview import RunView, load_run  # noqa: E402
from evomerge.verdict import Comparison, choose_on_selection, heldout_comparisons, selection_mean  # noqa: E402


def claim(view: RunView, member: str, comparisons: list[Comparison]) -> tuple[bool, str]:
    """(holds, one line): the demo's claim about ``member`` against the uniform average and the sources."""
    uniform = next((c for c in comparisons if c.baseline == UNIFORM), None)
    sources = [c for c in comparisons if is_source_label(c.baseline)]
    if uniform is None or not sources:
        return False, "the run has no held-out per-item scores of the uniform average or the sources"
    if not uniform.difference.above_zero:
        return False, (f"{member} does not beat the uniform average beyond noise on the held-out mean: "
                       f"difference {uniform.difference.describe()} (95% interval must be above 0)")
    lost = [c for c in sources if c.difference.diff <= 0]
    if lost:
        c = lost[0]
        return False, f"{member} does not beat {_label(c.baseline)} on the held-out mean: {c.difference.describe()}"
    worst = min(sources, key=lambda c: c.difference.diff)
    return True, (f"{member} beats the uniform average by {uniform.difference.describe()} and every specialist "
                  f"on the held-out mean (closest: {_label(worst.baseline)}, {worst.difference.describe()})")


def _label(ref: str) -> str:
    return f"specialist {short_label(ref)}" if is_source_label(ref) else display_label(ref)


def report(view: RunView, rule: str = "mean", out=print) -> bool:
    names = view.objective_names
    member = choose_on_selection(view, rule)  # selection scores only
    chosen = view.get(member)
    comparisons = heldout_comparisons(view, member)
    held = view.heldout[member]
    n_items = {n: len(view.heldout_items[member][n]) for n in names}
    methods = sorted({g.get("method", "?") for g in ((chosen.recipe or {}).get("groups") or {}).values()})
    out(f"chosen on the selection split ({'best selection mean' if rule == 'mean' else 'knee'}): {member} "
        f"({', '.join(methods)}), selection mean {selection_mean(chosen.scores, view):.3f}")
    items = ", ".join(f"{n} {k}" for n, k in n_items.items())
    out(f"held-out exact match ({items} items); last column: chosen minus row, 95% paired bootstrap interval")
    width = 26
    out("model".ljust(width) + "".join(n.rjust(8) for n in names) + "mean".rjust(8) + "   chosen − model")
    mean = lambda s: sum(s[n] for n in names) / len(names)  # noqa: E731
    out(f"chosen {member}".ljust(width) + "".join(f"{held[n]:8.3f}" for n in names) + f"{mean(held):8.3f}")
    for c in comparisons:
        out(_label(c.baseline).ljust(width) + "".join(f"{c.heldout[n]:8.3f}" for n in names)
            + f"{mean(c.heldout):8.3f}   {c.difference.describe()}")
    ok, line = claim(view, member, comparisons)
    out(("verdict: met — " if ok else "verdict: NOT met — ") + line)
    return ok


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", nargs="?", default="runs/demo")
    ap.add_argument("--rule", choices=["mean", "knee"], default="mean",
                    help="how the member is chosen from the front, on selection scores")
    args = ap.parse_args(argv)
    try:
        view = load_run(Path(args.run_dir))
        return 0 if report(view, args.rule) else 1
    except RunDirError as err:
        print(f"demo_report: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
