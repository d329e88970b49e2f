"""`evomerge` command line: search | resume | status | export | merge | plot | check.

This module parses arguments and turns user errors into one line on stderr with exit
status 2. The commands live beside it (``search_commands``: search, resume;
``view_commands``: status, plot; ``model_commands``: merge, export; ``check_command``:
check) and are imported lazily, so ``evomerge --help`` stays fast (torch and Ray are
slow to import).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from evomerge import __version__
from evomerge.errors import EvomergeError


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="run an evolutionary merge search from a YAML config")
    p.add_argument("config", help="search config YAML (see configs/demo.yaml)")
    p.add_argument("--run-dir", help="run directory (default: output.run_dir or runs/<name>)")
    p.add_argument("--address", help="Ray cluster address ('auto', 'ray://host:10001'); default: embedded local Ray")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set budget.evaluations=50 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace a run dir that holds a different search")
    p.add_argument("--no-progress", action="store_true", help="no live progress display")
    p.set_defaults(func=_lazy("evomerge.cli.search_commands", "search_command"))


def _add_resume(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="continue a search from its run directory to its budget")
    p.add_argument("run_dir")
    p.add_argument("--budget", type=int, metavar="N",
                   help="raise the run's evaluation budget to N (updates budget.evaluations of its config.yaml)")
    p.add_argument("--address", help="Ray cluster address; default: embedded local Ray")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_lazy("evomerge.cli.search_commands", "resume_command"))


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show a run's Pareto front, progress and throughput")
    p.add_argument("run_dir")
    p.add_argument("--rescore", action="store_true", help="score the front on the heldout split now")
    p.add_argument("--address", help="Ray address for --rescore")
    p.set_defaults(func=_lazy("evomerge.cli.view_commands", "status_command"))


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a front member as a Hugging Face model folder (and push it)")
    p.add_argument("run_dir")
    pick = p.add_mutually_exclusive_group(required=True)
    pick.add_argument("--id", help="evaluation id of the member")
    pick.add_argument("--best", metavar="OBJECTIVE", help="the best member on one objective")
    pick.add_argument("--knee", action="store_true", help="the member closest to the ideal point")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--push-to-hub", metavar="OWNER/NAME")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision")
    p.add_argument("--commit-message")
    p.set_defaults(func=_lazy("evomerge.cli.model_commands", "export_command"))


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models from a recipe JSON or a mergekit YAML into a HF folder")
    p.add_argument("recipe", help="recipe.json or mergekit YAML")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu", help="device for the tensor math (cpu, cuda)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt checkpoints (unsafe)")
    p.set_defaults(func=_lazy("evomerge.cli.model_commands", "merge_command"))


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="draw a run's Pareto front and its progress over time")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/report.png)")
    p.set_defaults(func=_lazy("evomerge.cli.view_commands", "plot_command"))


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a config offline (no weights, no Ray) and print the search plan")
    p.add_argument("config", help="search config YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, as for search (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="plan the actors for this device (default: ray.use_gpu, else a GPU if this machine has one)")
    p.add_argument("--memory-gb", type=float, metavar="N",
                   help="memory of one actor in GiB (GPU memory for cuda); default: ray.actor_memory_gb, "
                        "else what is free on this machine")
    p.set_defaults(func=_lazy("evomerge.cli.check_command", "check_command"))


def _lazy(module: str, attr: str) -> Callable[[argparse.Namespace], int | None]:
    def run(args: argparse.Namespace) -> int | None:
        import importlib

        return getattr(importlib.import_module(module), attr)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_search, _add_resume, _add_status, _add_export, _add_merge, _add_plot, _add_check):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rc = args.func(args)
    except EvomergeError as err:
        print(f"evomerge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"evomerge {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)

