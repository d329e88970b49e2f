"""``evomerge merge`` and ``evomerge export``: commands that write a Hugging Face model folder.

The work is the merge engine's (``merge.materialise.merge_to_folder``) and the export
module's; here are only the argument handling and the one-line errors.
"""

from __future__ import annotations

import argparse
import time

from evomerge.errors import EvomergeError, SourceError
from evomerge.export import check_repo_id, export_member, push_folder
from evomerge.merge.materialise import merge_to_folder
from evomerge.merge.recipe_files import load_recipe_file


def merge_command(args: argparse.Namespace) -> int:
    """``evomerge merge RECIPE --out DIR``: one merge, streamed to a HF folder."""
    t0 = time.perf_counter()
    from evomerge.merge.layer_stack import LayerStack, stack_from_path, write_stack
    from evomerge.merge.path_recipe import PathRecipe

    recipe = load_recipe_file(args.recipe)
    try:
        if isinstance(recipe, (PathRecipe, LayerStack)):
            # a data-flow path or a layer stack: layers copied (scales folded), no tensor math
            # that a --device would speed up, so --device is not used
            stack = stack_from_path(recipe) if isinstance(recipe, PathRecipe) else recipe
            out = write_stack(stack, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                              allow_pickle=args.allow_pickle)
            what = f"stacked {len(stack.layers)} layer(s) from {len(stack.models)} model(s)"
        else:
            out = merge_to_folder(recipe, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                                  device=args.device, allow_pickle=args.allow_pickle)
            what = f"merged {len(recipe.sources)} source(s)"
    except EvomergeError:
        raise
    except (OSError, MemoryError) as err:
        raise SourceError(f"merge into {args.out} failed: {type(err).__name__}: {err}") from None
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    print(f"{what} into {out} ({len(files)} weight file(s), {time.perf_counter() - t0:.1f}s)")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """``evomerge export RUN_DIR (--id|--best|--knee) --out DIR [--push-to-hub ...]``."""
    repo_id = getattr(args, "push_to_hub", None)
    if repo_id:
        check_repo_id(repo_id)  # before the merge, not after it
    out, member = export_member(args.run_dir, args.out, eval_id=getattr(args, "id", None),
                                best=getattr(args, "best", None), knee=bool(getattr(args, "knee", False)),
                                dtype=getattr(args, "dtype", None),
                                max_shard_size=getattr(args, "max_shard_size", None) or "2GB",
                                title=(repo_id.rsplit("/", 1)[-1] if repo_id else None))
    print(f"exported {member.id} to {out}")
    if repo_id:
        url = push_folder(out, repo_id, private=bool(getattr(args, "private", False)),
                          revision=getattr(args, "revision", None), commit_message=getattr(args, "commit_message", None))
        print(f"pushed {out} to {url}")
    return 0
