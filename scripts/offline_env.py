"""Shared set-up of the scripts that drive other tools (mergekit, transformers) offline.

Why: a benchmark or comparison must never reach a hub, and its subprocesses inherit these
variables; one place keeps the scripts agreeing on them. Importing this module sets them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root
BIN = Path(sys.executable).parent  # console scripts of this venv (evomerge, mergekit-yaml)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}.items():
    os.environ.setdefault(_name, _value)
