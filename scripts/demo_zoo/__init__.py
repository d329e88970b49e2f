"""Helpers of ``scripts/build_demo_zoo.py``: tokenizer, training loop, greedy scoring, merge check.

Kept out of the ``evomerge`` package on purpose: they exist only to build the offline demo
models, and nothing at search time imports them.
"""
