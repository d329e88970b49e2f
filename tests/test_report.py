"""status / plot / draw_report on hand-made run directories (tests/synthetic_run.py).

Expected numbers are worked out by hand from the table in synthetic_run.py:
hypervolume reference = the driver archive's default, the worst score seen = (add 0.1,
ppl 6.0); in 'larger is better' coordinates (add, -ppl) the front's staircase is
e000002: 0.4 * 0 + e000001: 0.2 * 2.0 + e000003: 0.2 * 3.0 + e000006: 0 * 3.5 = 1.0.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.errors import RunDirError
from evomerge.report import build_figure, draw_report, progress, summary
from evomerge.runview import load_run
from synthetic_run import FRONT, write_run


@pytest.fixture
def run2(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run2")


@pytest.fixture
def run3(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run3", three=True)


def test_progress_curves_by_hand(run2: Path) -> None:
    p = progress(load_run(run2))
    assert p.x == [1, 2, 3, 4, 5, 6, 7]
    assert p.best["add"] == [0.2, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9]
    assert p.best["ppl"] == [5.0, 4.0, 4.0, 3.0, 3.0, 3.0, 2.5]  # minimised: best is the lowest
    assert p.reference == pytest.approx({"add": 0.1, "ppl": 6.0})
    # e0 alone: 0.1*1.0; e1 dominates e0: 0.4*2.0; e2 sits on the ppl reference: +0; e3: 0.2*2 + 0.2*3;
    # failed / dominated: flat; e6 sits on the add reference: +0
    assert p.hypervolume == pytest.approx([0.1, 0.8, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_summary_numbers(run2: Path) -> None:
    s = summary(load_run(run2))
    assert (s["done"], s["budget"], s["failed"], s["front_size"]) == (7, 20, 1, 4)
    assert s["hypervolume"] == pytest.approx(1.0)
    # 7 evaluations between the first ask (t0) and the last finish (t0 + 6*60 + 50 = t0 + 410 s)
    assert s["per_hour"] == pytest.approx(7 / (410 / 3600))


def test_rate_ignores_the_time_a_run_was_stopped(run2: Path) -> None:
    # resumed 10 hours later: one more evaluation of 50 s; the night does not count
    with (run2 / "evaluations.jsonl").open("a") as fh:
        fh.write(json.dumps({"kind": "evaluation", "id": "e000007", "index": 7, "asked": 8, "recipe": None,
                             "status": "failed", "losses": [], "scores": {}, "asked_at": 1_036_000.0,
                             "finished_at": 1_036_050.0}) + "\n")
    assert summary(load_run(run2))["per_hour"] == pytest.approx(8 / (460 / 3600))


def test_front_recomputed_when_front_json_missing(tmp_path: Path) -> None:
    view = load_run(write_run(tmp_path / "r", front_json=False))
    assert sorted(view.front) == sorted(FRONT)
    assert view.front_hypervolume == pytest.approx(1.0)
    assert [o.direction for o in view.objectives] == ["maximize", "minimize"]  # from config (perplexity)


def test_front_recomputed_when_log_is_ahead_of_front_json(run2: Path) -> None:
    # e000007 dominates e000001 and e000003 after the last checkpoint wrote front.json
    with (run2 / "evaluations.jsonl").open("a") as fh:
        fh.write(json.dumps({"kind": "evaluation", "id": "e000007", "index": 7, "asked": 8, "recipe": None,
                             "status": "ok", "losses": [-0.6, 2.9], "scores": {"add": 0.6, "ppl": 2.9}}) + "\n")
    assert sorted(load_run(run2).front) == ["e000002", "e000006", "e000007"]


def test_torn_last_line_is_skipped(run2: Path) -> None:
    with (run2 / "evaluations.jsonl").open("a") as fh:
        fh.write('{"kind": "evaluation", "id": "e0000')  # crash mid-append
    view = load_run(run2)
    assert len(view.evaluations) == 7
    assert view.heldout["e000001"]["add"] == 0.45


def test_corrupt_middle_line_is_one_line_error(run2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # garbage followed by good records is corruption, not a torn write: refused by status/plot/export
    # alike (fileio.read_jsonl, the rule resume uses), never silently skipped
    log = run2 / "evaluations.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:3]) + '{"kind": "evaluation", "id": "e0000\n' + "".join(lines[3:]))
    with pytest.raises(RunDirError, match="line 4 is corrupt") as err:
        load_run(run2)
    assert "\n" not in str(err.value)
    for cmd in ("status", "plot"):
        assert main([cmd, str(run2)]) == 2
        out = capsys.readouterr().err.strip()
        assert "\n" not in out and "line 4 is corrupt" in out


def test_scatter_figure_axes_and_legend(run2: Path) -> None:
    fig = build_figure(load_run(run2), highlight="e000001")
    front_ax = fig.axes[0]
    assert front_ax.get_xlabel() == "add (higher is better)"
    assert front_ax.get_ylabel() == "ppl (lower is better)"
    legend = [t.get_text() for t in front_ax.get_legend().get_texts()]
    assert legend == ["evaluated (6)", "Pareto front (4)", "uniform average", "source: src0", "source: src1",
                      "exported (e000001)"]
    (line,) = front_ax.get_lines()  # the front, connected in order of 'add'
    assert list(line.get_xdata()) == [0.1, 0.3, 0.5, 0.9]
    assert list(line.get_ydata()) == [2.5, 3.0, 4.0, 6.0]
    # progress panels: one per objective + hypervolume, sharing "evaluations"
    side = fig.axes[1:]
    assert [a.get_ylabel() for a in side] == ["best add", "best ppl", "hypervolume"]
    assert side[-1].get_xlabel() == "evaluations"
    assert list(side[-1].get_lines()[0].get_ydata()) == pytest.approx([0.1, 0.8, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_parallel_coordinates_for_three_objectives(run3: Path) -> None:
    fig = build_figure(load_run(run3))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "add (higher is better)", "ppl (lower is better)", "rev (higher is better)"]
    assert ax.get_ylabel() == "normalised score (1 = best seen)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Pareto front (4)" in legend and "uniform average" in legend
    # e000006 (add 0.1 worst, ppl 2.5 best, rev 0.5): normalised so that up = better
    red = [l for l in ax.get_lines() if l.get_color() == "#d62728"]
    ys = sorted(tuple(round(v, 6) for v in l.get_ydata()) for l in red)
    # rev range over evaluations+references: [0.1, 0.9]; ppl range [2.5, 6.0]; add range [0.1, 0.9]
    assert (0.0, 1.0, 0.5) in ys
    assert [a.get_ylabel() for a in fig.axes[1:]] == ["best add", "best ppl", "best rev", "hypervolume"]


def test_draw_report_writes_png_atomically_and_cheaply(run2: Path) -> None:
    t = time.perf_counter()
    path = draw_report(run2)
    elapsed = time.perf_counter() - t
    assert path == run2 / "report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run2.iterdir() if p.name.endswith(".tmp")]
    assert elapsed < 10.0  # called at every checkpoint: must stay cheap


def test_plot_command_via_cli(run3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "custom.png"
    assert main(["plot", str(run3), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert str(out) in capsys.readouterr().out


def test_status_command_table_and_progress(run2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(run2)]) == 0
    out = capsys.readouterr().out
    for eid in FRONT:
        assert eid in out
    assert "e000000" not in out and "e000005" not in out  # dominated: not in the front table
    assert "0.45" in out and "6.3" in out  # heldout scores of e000001 / e000002
    assert "evaluations: 7 / 20   failed: 1   front: 4   hypervolume: 1" in " ".join(out.split("\n"))


def test_status_rescore_calls_the_search_layer(run2: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def rescore_front(run_dir, address, on_done=None):  # the search layer appends heldout records
        calls.append((Path(run_dir), address))
        with (Path(run_dir) / "evaluations.jsonl").open("a") as fh:
            fh.write(json.dumps({"kind": "heldout", "id": "e000006", "scores": {"add": 0.0777, "ppl": 2.6}}) + "\n")

    monkeypatch.setitem(sys.modules, "evomerge.search.session", types.SimpleNamespace(rescore_front=rescore_front))
    assert main(["status", str(run2), "--rescore", "--address", "auto"]) == 0
    assert calls == [(run2, "auto")]
    assert "0.0777" in capsys.readouterr().out


def test_status_of_missing_run_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not exist" in err


def test_reads_what_the_real_run_writers_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """rundir.RunDir + pareto.ParetoArchive (the driver's writers) -> status/plot agree with them."""
    from evomerge.config import parse_config
    from evomerge.pareto import ParetoArchive
    from evomerge.records import EvaluationRecord, HeldoutRecord, Status
    from evomerge.rundir import RunDir
    from synthetic_run import SCORES

    cfg = parse_config({"name": "real", "models": {"base": "b", "sources": ["s1", "s2"]},
                        "objectives": [{"name": "add", "task": "demo_add", "metric": "exact_match"},
                                       {"name": "ppl", "evaluator": "perplexity", "files": ["x"],
                                        "direction": "minimize"}],
                        "budget": {"evaluations": 10}})
    run = RunDir(tmp_path / "real")
    assert run.create(cfg)
    arch = ParetoArchive({"add": "maximize", "ppl": "minimize"})
    recipes = {}
    for k, (eid, sc) in enumerate(SCORES.items()):
        ok = sc is not None
        scores = {"add": sc[0], "ppl": sc[1]} if ok else {}
        recipes[eid] = {"sources": ["s1"]}
        run.append(EvaluationRecord(id=eid, index=k, asked=k + 1, recipe=recipes[eid],
                                    status=Status.OK if ok else Status.FAILED, scores=scores,
                                    losses=[-sc[0], sc[1]] if ok else [], asked_at=10.0 * k,
                                    finished_at=10.0 * k + 5))
        if ok:
            arch.add(eid, scores)
    run.append(HeldoutRecord(id="e000003", status=Status.OK, scores={"add": 0.25, "ppl": 3.3}))
    run.append(HeldoutRecord(id="e000006", status=Status.FAILED, error="x"))
    run.write_front(arch, recipes, {"e000003": {"add": 0.25, "ppl": 3.3}}, evaluations=len(SCORES))
    view = load_run(run.path)
    assert view.front == arch.front() and sorted(view.front) == sorted(FRONT)
    assert view.heldout == {"e000003": {"add": 0.25, "ppl": 3.3}}  # the failed rescoring is not a score
    assert summary(view)["hypervolume"] == pytest.approx(arch.hypervolume())
    assert progress(view).hypervolume[-1] == pytest.approx(json.loads(run.front_json_path.read_text())["hypervolume"])
    assert main(["status", str(run.path)]) == 0 and "e000003" in capsys.readouterr().out
    assert draw_report(run.path) == run.path / "report.png"


def test_hypervolume_by_hand_and_against_the_archive() -> None:
    import random

    from evomerge.pareto import MINIMIZE, hypervolume, hypervolume_max

    assert hypervolume_max([[1, 1, 1]], [0, 0, 0]) == 1.0
    assert hypervolume_max([[2, 1, 1], [1, 2, 1]], [0, 0, 0]) == 3.0  # 2 + 2 - overlap 1
    assert hypervolume_max([[2, 1, 1], [1, 1, 1]], [0, 0, 0]) == 2.0  # a dominated point adds nothing
    assert hypervolume_max([[0.5, 3]], [1, 0]) == 0.0  # not above the reference everywhere
    rng = random.Random(3)
    for d in (2, 3, 4):
        for _ in range(20):
            pts = [[rng.random() for _ in range(d)] for _ in range(rng.randint(1, 10))]
            names = [f"o{k}" for k in range(d)]  # the same front, minimised: the score-dict entry point
            expected = hypervolume([{n: -v for n, v in zip(names, p)} for p in pts], {n: MINIMIZE for n in names},
                                   {n: -0.1 for n in names})
            assert hypervolume_max(pts, [0.1] * d) == pytest.approx(expected, abs=1e-12)


def test_long_run_curve_is_thinned_but_monotone_and_exact_at_the_end(tmp_path: Path) -> None:
    import random

    from evomerge.report import CURVE_POINTS

    run = write_run(tmp_path / "long", front_json=False)
    rng = random.Random(0)
    with (run / "evaluations.jsonl").open("a") as fh:
        for i in range(7, 7 + 2 * CURVE_POINTS):
            a = rng.random()
            ppl = 2.0 + 5 * (1 - a) ** 2 + rng.random()
            fh.write(json.dumps({"kind": "evaluation", "id": f"e{i:06d}", "index": i, "asked": i + 1, "recipe": None,
                                 "status": "ok", "losses": [-a, ppl], "scores": {"add": a, "ppl": ppl}}) + "\n")
    view = load_run(run)
    p = progress(view)
    assert len(p.hypervolume) == 7 + 2 * CURVE_POINTS
    assert all(b >= a for a, b in zip(p.hypervolume, p.hypervolume[1:]))
    assert p.hypervolume[-1] == pytest.approx(summary(view)["hypervolume"])
    assert p.hypervolume[-1] == pytest.approx(view.front_hypervolume)


def test_plot_out_problems_are_one_line(run2: Path, tmp_path: Path, capsys) -> None:
    """--out naming a folder, a missing folder or an unwritable one: one line, exit 2, nothing written."""
    import os

    (tmp_path / "d").mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cases = [(tmp_path / "d", "is a folder; pass a file name"), (tmp_path / "missing" / "r.png", "does not exist"),
             (ro / "r.png", "is not writable")]
    if os.geteuid() == 0:  # root writes anywhere: the permission case cannot be shown
        cases = cases[:2]
    for out, needle in cases:
        assert main(["plot", str(run2), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert list((tmp_path / "d").iterdir()) == []
    ro.chmod(0o700)


def test_directions_without_front_json_come_from_the_evaluators_not_from_names(tmp_path: Path) -> None:
    """A run dir that crashed before its first front.json: directions as the search derives them."""
    import yaml

    from evomerge.runview import load_run

    run = tmp_path / "run"
    run.mkdir()
    cfg = {"name": "t", "models": {"sources": ["a", "b"]}, "budget": {"evaluations": 4},
           "objectives": [{"name": "skill", "task": "demo_sort", "metric": "exact_match"},
                          {"name": "loss", "evaluator": "perplexity", "files": ["x.txt"]},
                          {"name": "perplexity", "task": "demo_upper", "metric": "exact_match"}]}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    view = load_run(run)
    # "perplexity" is only a name here: its metric, exact_match, is better high
    assert view.directions == {"skill": "maximize", "loss": "minimize", "perplexity": "maximize"}
