#!/usr/bin/env python
"""The data-flow demo's table: sources, uniform average, parameter-space winner, data-flow and chained results.

    .venv/bin/python scripts/dataflow_report.py [--param runs/demo] [--dataflow runs/demo_dataflow]
                                                [--chained runs/demo_chained] [--rule mean|knee]

Each run's member is chosen on its *selection* scores only (``evomerge.verdict``, the best
selection mean by default); then every model is shown with its held-out mean (the mean over
skills of the per-item accuracy, on items no candidate was chosen on) and a 95% bootstrap
interval, and each search result is compared with the parameter-space winner item by item
(paired bootstrap). Runs that do not exist yet are skipped, with a line saying how to make them.
The specialists and the uniform average come from the parameter-space run, whose items are
the same (``heldout_limit: all`` in every demo config).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evomerge.paired import mean_interval, paired_difference  # noqa: E402
from evomerge.records import UNIFORM, display_label, is_source_label  # noqa: E402
from evomerge.runview import RunView, load_run  # noqa: E402
from evomerge.verdict import choose_on_selection  # noqa: E402


def _row(name: str, items: dict[str, list[float]], names: list[str]) -> list[str]:
    mean, low, high = mean_interval(items, names)
    per = [f"{sum(items[n]) / len(items[n]):.3f}" for n in names]
    return [name, *per, f"{mean:.3f} [{low:.3f}, {high:.3f}]"]


def _member_items(view: RunView, rule: str) -> tuple[str, dict[str, list[float]]]:
    member = choose_on_selection(view, rule)  # type: ignore[arg-type]
    items = view.heldout_items.get(member)
    if not items:
        raise SystemExit(f"{view.path}: member {member} has no per-item held-out scores; run "
                         f"`evomerge status {view.path} --rescore`")
    return member, items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--param", default="runs/demo")
    ap.add_argument("--dataflow", default="runs/demo_dataflow")
    ap.add_argument("--chained", default="runs/demo_chained")
    ap.add_argument("--rule", choices=["mean", "knee"], default="mean")
    args = ap.parse_args(argv)

    if not (Path(args.param) / "evaluations.jsonl").is_file():
        print(f"{args.param}: no run; make it with `.venv/bin/python scripts/run_demo.py`")
        return 2
    param = load_run(args.param)
    names = param.objective_names
    rows: list[list[str]] = []
    for ref in param.references:
        if ref.heldout_items and (ref.label == UNIFORM or is_source_label(ref.label)):
            rows.append(_row(display_label(ref.label), ref.heldout_items, names))
    winner, winner_items = _member_items(param, args.rule)
    rows.append(_row(f"parameter-space winner ({Path(args.param).name} {winner})", winner_items, names))
    diffs: list[str] = []
    for label, path in (("data-flow", args.dataflow), ("chained", args.chained)):
        if not (Path(path) / "evaluations.jsonl").is_file():
            print(f"{path}: no run yet; `evomerge search configs/{Path(path).name}.yaml` makes it")
            continue
        view = load_run(path)
        if view.objective_names != names:
            print(f"{path}: objectives {view.objective_names} differ from {names}; skipped")
            continue
        member, items = _member_items(view, args.rule)
        rows.append(_row(f"{label} result ({Path(path).name} {member}, {len(view.evaluations)} evaluations)",
                         items, names))
        d = paired_difference(items, winner_items, names)
        diffs.append(f"{label} result minus parameter-space winner: {d.describe()}")

    header = ["model (held-out items)", *names, "mean [95% interval]"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print()
    for line in diffs:
        print(line)
    print(f"(members chosen on selection scores, rule '{args.rule}'; intervals: percentile bootstrap over items)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
