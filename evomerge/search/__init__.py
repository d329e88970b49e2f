"""The search layer: a plan checked before Ray starts, actors that merge and score, and the loop.

Modules, in the order a run meets them:

- ``plan``: every resource check of a config, run once; the facts a run needs (model set,
  space, objective directions, optimizer) computed once and handed down.
- ``ray_cluster``: connecting to or starting Ray, and how many actors it can hold.
- ``memory``: each actor's memory plan (the fastest residency that fits), before any actor starts.
- ``actor``: the Ray actor that keeps one live model and merges and scores recipes in place.
- ``pool``: the driver's view of its actors (one job each, failures, restarts, time-outs).
- ``searchbook``: the optimizer's ask/tell bookkeeping, replayable from the log.
- ``references``: the baselines (uniform average, each source, the base), scored once per run.
- ``loop``: the steady-state search over a run directory.
- ``heldout``: re-scoring front members on the held-out split (search end, ``status --rescore``).
- ``session``: one locked session on a run directory (Ray up, the loop or the re-score, Ray down).

Nothing here imports the views (reports, export) or the CLI above it.
"""
