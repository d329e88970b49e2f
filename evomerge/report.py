"""Reports on a run: the ``status`` table and the ``report.png`` plot.

Both read the run directory only (``evomerge.runview``), so they work on a finished run,
on a crashed one, and while the driver is still writing it. ``draw_report`` is called by
the driver at every checkpoint, so it must be cheap: it draws with matplotlib's Agg
canvas on a private ``Figure`` (no pyplot global state, no GUI backend), computes the
progress curves incrementally, and writes the PNG atomically (``fileio.atomic_write``) so
a viewer never sees half an image. Hypervolumes come from ``evomerge.pareto``, the same
code that writes front.json's number.

Pure parts (``progress``, ``summary``, ``build_figure``) return data or a Figure, so tests
can check the numbers and the axes directly.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from evomerge.fileio import atomic_write
from evomerge.pareto import ParetoArchive
from evomerge.records import BASE, UNIFORM, EvaluationRecord, ReferenceRecord, display_label, is_source_label, short_label
from evomerge.runview import Objective, RunView, load_run, log_archive

FRONT_COLOR = "#d62728"
GREY = "#9a9a9a"
REF_COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def axis_label(o: Objective) -> str:
    """Axis names carry the objective and which way is better."""
    return f"{o.name} ({'higher' if o.maximized else 'lower'} is better)"


# -- numbers (pure) ------------------------------------------------------------------------
@dataclass
class Progress:
    """Curves over the run, x = number of finished evaluations (failures included)."""

    x: list[int]
    best: dict[str, list[float]]  # best-so-far of each objective (NaN before the first success)
    hypervolume: list[float]  # of the non-dominated set so far, w.r.t. ``reference``
    reference: dict[str, float] | None


#: the hypervolume curve is evaluated at most at this many evaluation counts (plus the end)
CURVE_POINTS = 100


def progress(view: RunView) -> Progress:
    """Best-so-far per objective and hypervolume-so-far after each finished evaluation.

    The hypervolume uses one reference for the whole curve, the driver's archive default
    at the end of the run (the worst score seen per objective), so the curve can only grow
    and its last point is the number ``status`` and front.json report. It is recomputed
    only where the front changed, at most at CURVE_POINTS evaluation counts (held
    in between), so redrawing at every checkpoint stays cheap on long runs.
    """
    objs = view.objectives
    final = log_archive(view)
    ref = final.reference_point() if len(final) else None
    arch = ParetoArchive(view.directions)
    n_total = len(view.evaluations)
    grid = {max(1, round(k * n_total / CURVE_POINTS)) for k in range(1, CURVE_POINTS + 1)} | {n_total}
    x: list[int] = []
    best: dict[str, list[float]] = {o.name: [] for o in objs}
    hv: list[float] = []
    cur = {o.name: math.nan for o in objs}
    cur_hv, dirty = 0.0, False
    for n, e in enumerate(view.evaluations, 1):
        if view.scored(e):
            for o in objs:
                v = e.scores[o.name]
                if math.isnan(cur[o.name]) or o.sign * v > o.sign * cur[o.name]:
                    cur[o.name] = v
            dirty = arch.add(f"{e.id}#{n}", e.scores) or dirty
        if dirty and ref is not None and n in grid:
            cur_hv, dirty = arch.hypervolume(ref), False
        x.append(n)
        for o in objs:
            best[o.name].append(cur[o.name])
        hv.append(cur_hv)
    return Progress(x=x, best=best, hypervolume=hv, reference=ref)


def active_seconds(spans: Sequence[tuple[float, float]], bridge_s: float = 300.0) -> float:
    """Wall time the search was running: the union of evaluation spans, short gaps bridged.

    A run stopped overnight and resumed must not count the night, but the few seconds
    between one evaluation and the next (ask, tell, checkpoint) are part of the run.
    """
    total = 0.0
    cur: list[float] | None = None
    for a, b in sorted(spans):
        if cur is not None and a <= cur[1] + bridge_s:
            cur[1] = max(cur[1], b)
            continue
        if cur is not None:
            total += cur[1] - cur[0]
        cur = [a, b]
    if cur is not None:
        total += cur[1] - cur[0]
    return total


def summary(view: RunView) -> dict[str, Any]:
    """The progress line of ``status``: done/budget, failures, front size, hypervolume, rate."""
    done = len(view.evaluations)
    active = active_seconds([(e.asked_at, e.finished_at) for e in view.evaluations
                             if isinstance(e.asked_at, (int, float)) and isinstance(e.finished_at, (int, float))])
    per_hour = done / (active / 3600.0) if active > 0 else None
    arch = log_archive(view)
    ref = arch.reference_point() if len(arch) else None
    budget = view.budget()
    return {"done": done, "budget": budget.get("evaluations"), "wall_clock_s": budget.get("wall_clock_s"),
            "failed": view.failed, "front_size": len(view.front), "hypervolume": arch.hypervolume(),
            "reference": ref, "per_hour": per_hour, "fidelity": fidelity_summary(view)}


def items_spent(evaluation: Any, full_items: int) -> int:
    """Item evaluations one logged candidate cost: nothing when served from the cache; its screen's items;
    and, when measured in full, every selection item (``full_items``) -- less the screened ones when the
    full evaluation reused them (``screen.reuse``; screens logged before reuse re-scored every item)."""
    if evaluation.cached_from:
        return 0
    screen = evaluation.screen or {}
    screened = int(screen.get("n_items") or 0)
    if not (evaluation.ok and evaluation.measured):
        return screened
    return full_items if (screen.get("promoted") and screen.get("reuse")) else screened + full_items


def fidelity_summary(view: RunView) -> dict[str, Any] | None:
    """A screening run's counts (``evaluation.fidelity``): screened, promoted and measured, estimates only,
    and the items spent per candidate against a full evaluation; None for a run that does not screen."""
    screened = [e for e in view.evaluations if e.screen and not e.cached_from]  # a cached duplicate costs nothing
    if not screened:
        return None
    full_items = sum(int(o.get("limit") or 0) for o in (view.config.get("objectives") or []))
    measured = [e for e in view.evaluations if e.ok and e.measured and not e.cached_from]
    estimated = view.estimated_evaluations()
    spent = sum(items_spent(e, full_items) for e in view.evaluations)
    n = len([e for e in view.evaluations if not e.cached_from]) or 1
    return {"estimator": screened[0].screen.get("estimator"), "screened": len(screened),
            "promoted": sum(1 for e in screened if e.screen.get("promoted")), "measured": len(measured),
            "estimates": len(estimated), "items_per_candidate": spent / n, "full_items": full_items}


# -- figure (pure) ------------------------------------------------------------------------------
def build_figure(view: RunView, highlight: str | None = None):
    """The report figure: the front (scatter or parallel coordinates) and progress panels."""
    from matplotlib.figure import Figure

    objs = view.objectives
    n_side = len(objs) + 1
    fig = Figure(figsize=(13, max(6.0, 1.9 * n_side)), dpi=100, layout="constrained")
    gs = fig.add_gridspec(n_side, 2, width_ratios=[1.5, 1.0])
    ax_front = fig.add_subplot(gs[:, 0])
    if len(objs) == 2:
        _scatter(ax_front, view, highlight)
    elif len(objs) >= 3:
        _parallel(ax_front, view, highlight)
    else:
        _single(ax_front, view, highlight)

    prog = progress(view)
    side = [fig.add_subplot(gs[k, 1]) for k in range(n_side)]
    for k, o in enumerate(objs):
        ax = side[k]
        ax.plot(prog.x, prog.best[o.name], color=REF_COLORS[k % len(REF_COLORS)], drawstyle="steps-post")
        ax.set_ylabel(f"best {o.name}", fontsize=9)
        ax.set_title(f"best {axis_label(o)} so far", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        ax.sharex(side[-1])
        ax.tick_params(labelbottom=False)
    ax = side[-1]
    ax.plot(prog.x, prog.hypervolume, color="black", drawstyle="steps-post")
    ax.set_ylabel("hypervolume", fontsize=9)
    ax.set_title("hypervolume of the front so far (reference: worst score seen)", fontsize=9, loc="left")
    ax.set_xlabel("evaluations")
    ax.grid(alpha=0.3)
    budget = view.budget().get("evaluations")
    fig.suptitle(f"{view.config.get('name') or view.path.name}: {len(view.evaluations)}"
                 f"{f'/{budget}' if budget else ''} evaluations, {view.failed} failed, front of {len(view.front)}",
                 fontsize=12)
    return fig


def _ref_label(ref: ReferenceRecord) -> str:
    """Legend and table name of a reference: ``uniform average``, ``source: sort`` (short), ``base``."""
    return f"source: {short_label(ref.label)}" if is_source_label(ref.label) else display_label(ref.label)


def _points(evals: Sequence[EvaluationRecord], names: Sequence[str]) -> list[list[float]]:
    return [[e.scores[n] for n in names] for e in evals]


def _scatter(ax, view: RunView, highlight: str | None) -> None:
    ox, oy = view.objectives
    ok = view.ok_evaluations()
    front = view.front_evaluations()
    front_ids = {e.id for e in front}
    rest = [e for e in ok if e.id not in front_ids]
    if rest:
        xs, ys = zip(*_points(rest, [ox.name, oy.name]))
        ax.scatter(xs, ys, s=18, color=GREY, alpha=0.55, label=f"evaluated ({len(ok)})", zorder=1)
    estimated = view.estimated_evaluations()
    if estimated:  # a screen's estimates: told to the optimizer, never on the front; drawn hollow
        xs, ys = zip(*_points(estimated, [ox.name, oy.name]))
        ax.scatter(xs, ys, s=18, facecolor="none", edgecolor=GREY, alpha=0.7, zorder=1,
                   label=f"estimated from a screen ({len(estimated)})")
    if front:
        pts = sorted(_points(front, [ox.name, oy.name]), key=lambda p: ox.sign * p[0])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=FRONT_COLOR, lw=1.5, zorder=2)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=46, color=FRONT_COLOR, edgecolor="black",
                   linewidth=0.6, label=f"Pareto front ({len(front)})", zorder=3)
    for k, ref in enumerate(view.references):
        if not all(n in ref.scores for n in (ox.name, oy.name)):
            continue
        style = {UNIFORM: ("*", 200), BASE: ("s", 70)}.get(ref.label, ("^", 80))
        ax.scatter([ref.scores[ox.name]], [ref.scores[oy.name]], marker=style[0], s=style[1],
                   color=REF_COLORS[k % len(REF_COLORS)], edgecolor="black", linewidth=0.6, zorder=4,
                   label=_ref_label(ref))
    _mark(ax, view, highlight, [ox.name, oy.name])
    ax.set_xlabel(axis_label(ox))
    ax.set_ylabel(axis_label(oy))
    ax.set_title("Pareto front (selection scores)", loc="left")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9, framealpha=0.85)


def _mark(ax, view: RunView, highlight: str | None, names: Sequence[str]) -> None:
    e = view.get(highlight) if highlight else None
    if e is not None and e.ok:
        ax.scatter([e.scores[names[0]]], [e.scores[names[1]]], s=260, facecolor="none", edgecolor="black",
                   linewidth=2.0, zorder=5, label=f"exported ({e.id})")


def _single(ax, view: RunView, highlight: str | None) -> None:
    """One objective: score against evaluation number (the 'front' is the best)."""
    (o,) = view.objectives
    ok = view.ok_evaluations()
    ax.scatter([e.index for e in ok], [e.scores[o.name] for e in ok], s=18, color=GREY, label="evaluated")
    front = view.front_evaluations()
    ax.scatter([e.index for e in front], [e.scores[o.name] for e in front], s=46, color=FRONT_COLOR,
               edgecolor="black", label="best")
    for k, ref in enumerate(view.references):
        if o.name in ref.scores:
            ax.axhline(ref.scores[o.name], ls="--", color=REF_COLORS[k % len(REF_COLORS)], label=ref.short_label)
    ax.set_xlabel("evaluation index")
    ax.set_ylabel(axis_label(o))
    ax.legend(fontsize=9)


def _parallel(ax, view: RunView, highlight: str | None) -> None:
    """Parallel coordinates: one vertical axis per objective, normalised so up = better."""
    objs = view.objectives
    names = [o.name for o in objs]
    ok = view.ok_evaluations()
    pts_all = [e.scores for e in ok] + [r.scores for r in view.references if all(n in r.scores for n in names)]
    if not pts_all:
        ax.set_xticks(range(len(objs)), [axis_label(o) for o in objs])
        return
    lo = {o.name: min(p[o.name] for p in pts_all) for o in objs}
    hi = {o.name: max(p[o.name] for p in pts_all) for o in objs}

    def norm(scores: dict[str, float]) -> list[float]:
        out = []
        for o in objs:
            span = hi[o.name] - lo[o.name]
            v = 0.5 if span == 0 else (scores[o.name] - lo[o.name]) / span
            out.append(v if o.maximized else 1.0 - v)
        return out

    xs = list(range(len(objs)))
    front_ids = {e.id for e in view.front_evaluations()}
    rest = [list(zip(xs, norm(e.scores))) for e in ok if e.id not in front_ids]
    if rest:  # one collection, not one Line2D per candidate: thousands of candidates stay cheap
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection(rest, colors=GREY, alpha=0.5, linewidths=0.8, label=f"evaluated ({len(ok)})"))
    estimated = view.estimated_evaluations()
    if estimated:  # a screen's estimates (evaluation.fidelity): told to the optimizer, never on the front
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection([list(zip(xs, norm(e.scores))) for e in estimated], colors=GREY, alpha=0.45,
                                         linewidths=0.7, linestyles="dotted",
                                         label=f"estimated from a screen ({len(estimated)})"))
    big = len(front_ids) > 30  # thin the lines of a large front so it stays legible
    for k, e in enumerate(view.front_evaluations()):
        ax.plot(xs, norm(e.scores), color=FRONT_COLOR, lw=0.8 if big else 1.6, alpha=0.6 if big else 1.0,
                marker="o", ms=2 if big else 4,
                label=f"Pareto front ({len(front_ids)})" if k == 0 else None)
    for k, ref in enumerate(r for r in view.references if all(n in r.scores for n in names)):
        ax.plot(xs, norm(ref.scores), color=REF_COLORS[k % len(REF_COLORS)], lw=2.0, ls="--",
                label=_ref_label(ref))
    e = view.get(highlight) if highlight else None
    if e is not None and e.ok:
        ax.plot(xs, norm(e.scores), color="black", lw=3.0, label=f"exported ({e.id})")
    for x, o in zip(xs, objs):
        ax.axvline(x, color="black", lw=0.8)
        best, worst = (hi, lo) if o.maximized else (lo, hi)
        ax.annotate(f"{best[o.name]:.3g}", (x, 1.0), xytext=(3, 4), textcoords="offset points", fontsize=8)
        ax.annotate(f"{worst[o.name]:.3g}", (x, 0.0), xytext=(3, -12), textcoords="offset points", fontsize=8)
    ax.set_xticks(xs, [axis_label(o) for o in objs], fontsize=9)
    ax.set_ylim(-0.08, 1.08)
    ax.set_ylabel("normalised score (1 = best seen)")
    ax.set_title("Pareto front, parallel coordinates (selection scores)", loc="left")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3, fontsize=9, frameon=False)


# -- writing ------------------------------------------------------------------------------------
def draw_report(run: str | Path | RunView, out: str | Path | None = None, *, highlight: str | None = None) -> Path:
    """Render ``report.png`` (default: inside the run dir) atomically; returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    view = run if isinstance(run, RunView) else load_run(run)
    path = Path(out) if out is not None else view.path / "report.png"
    fig = build_figure(view, highlight=highlight)
    FigureCanvasAgg(fig)
    png = io.BytesIO()  # drawn in memory (a few hundred kB), then written whole: never half an image
    fig.savefig(png, format="png")
    return atomic_write(path, png.getvalue())


# -- status -------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def front_table(view: RunView):
    """Rich table of the front: id, each objective on selection and heldout, methods."""
    from rich.table import Table

    table = Table(title=f"Pareto front of {view.path} ({len(view.front)} members)")
    table.add_column("id", style="bold")
    for o in view.objectives:
        arrow = "↑" if o.maximized else "↓"
        table.add_column(f"{o.name} {arrow}\nsel", justify="right")
        table.add_column(f"{o.name} {arrow}\nheld", justify="right")
    table.add_column("method(s)")
    table.caption = "sel: selection items (searched on); held: held-out items (never searched on)"
    key = view.objectives[0]
    for e in sorted(view.front_evaluations(), key=lambda e: -key.sign * e.scores.get(key.name, 0.0)):
        held = view.heldout.get(e.id) or {}
        table.add_row(e.id, *[c for o in view.objectives for c in (_fmt(e.scores.get(o.name)), _fmt(held.get(o.name)))],
                      recipe_summary(e.recipe))
    if table.rows and view.references:
        table.rows[-1].end_section = True
    for r in view.references:
        table.add_row(f"[dim]{_ref_label(r)}[/dim]",
                      *[c for o in view.objectives for c in (_fmt(r.scores.get(o.name)),
                                                             _fmt((r.heldout or {}).get(o.name)))], "[dim]ref[/dim]")
    return table


def recipe_summary(recipe: dict[str, Any] | None) -> str:
    """The status table's last column: the merge methods of a recipe, or a path's layers (``A0 A1x1.20 B2``)."""
    from evomerge.merge.recipes import is_path_recipe, recipe_from_dict

    if is_path_recipe(recipe):
        try:
            return "path " + recipe_from_dict(recipe).describe()  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - a view shows what it can
            return "path"
    return ", ".join(sorted({g.get("method", "?") for g in ((recipe or {}).get("groups") or {}).values()}))


def progress_line(s: dict[str, Any]) -> str:
    budget = f" / {s['budget']}" if s["budget"] else ""
    rate = f"{s['per_hour']:.1f} evaluations/hour" if s["per_hour"] else "rate unknown"
    line = (f"evaluations: {s['done']}{budget}   failed: {s['failed']}   front: {s['front_size']}   "
            f"hypervolume: {s['hypervolume']:.4g}   {rate}")
    f = s.get("fidelity")
    if f:
        line += (f"\nscreened ({f['estimator']}): {f['screened']}, promoted {f['promoted']}; measured on every item: "
                 f"{f['measured']}; estimates only (told, never on the front): {f['estimates']}; items per "
                 f"candidate {f['items_per_candidate']:.0f} (a full evaluation: {f['full_items']})")
    return line
