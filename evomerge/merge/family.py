"""The task-arithmetic family as data: one row per method, the one table every path reads.

Why: task_arithmetic, TIES, DARE, breadcrumbs and DELLA (each with and without sign
election) are one formula - sparsify each task vector, weight it, optionally elect a sign
per element and keep only the agreeing entries, normalise, scale by lambda, add to the
base - and differ only in the choices a row names here, as in mergekit's own method
registry (mergekit 0.1.5, ``GeneralizedTaskArithmeticMerge``). The eager merge
(:mod:`evomerge.merge.gta`), the method's parameter table (:mod:`evomerge.merge.methods`),
the fused kernel's eligibility and plan (:mod:`evomerge.merge.fused`) and the mergekit YAML
translation all read these rows, so a method's traits and defaults are stated once.

Imports no torch: listing or describing the family costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

#: Every row's density default (mergekit's: keep everything).
DENSITY_DEFAULT = 1.0
#: Every row's lambda default (mergekit's: no scaling).
LAMBDA_DEFAULT = 1.0


@dataclass(frozen=True)
class Sparsification:
    """How each task vector is thinned before mixing (mergekit's ``sparsification_method``).

    ``params``: the per-source parameters it reads besides ``weight``, with mergekit's
    defaults; ``random``: its masks are drawn (one seed per source); ``ranked``: it keeps
    a magnitude-rank window, so it reads each source's presorted magnitude order.
    """

    name: str
    params: Mapping[str, float]
    random: bool = False
    ranked: bool = False


#: No sparsification: every entry is kept (density and rescale mean nothing).
NONE = Sparsification("none", MappingProxyType({}))
#: TIES trim: the ``density`` share of largest magnitudes.
MAGNITUDE = Sparsification("magnitude", MappingProxyType({"density": DENSITY_DEFAULT}), ranked=True)
#: Breadcrumbs: drop the ``gamma`` share of largest magnitudes, then the smallest, keeping ``density``.
OUTLIERS = Sparsification("magnitude_outliers", MappingProxyType({"density": DENSITY_DEFAULT, "gamma": 0.01}),
                          ranked=True)
#: DARE: keep each entry with probability ``density``.
RANDOM = Sparsification("random", MappingProxyType({"density": DENSITY_DEFAULT}), random=True)
#: DELLA MagPrune: keep probability rising with magnitude rank, ``density`` +/- ``epsilon``.
DELLA = Sparsification("della_magprune", MappingProxyType({"density": DENSITY_DEFAULT, "epsilon": 0.15}),
                       random=True)


@dataclass(frozen=True)
class FamilyRow:
    """One task-arithmetic-family method: its name, choices and mergekit's defaults.

    ``consensus``: TIES sign election and disjoint merge (mergekit's ``consensus_method:
    sum``); without it the sparsified deltas are simply summed. ``normalize``/``rescale``:
    the defaults of those method-level parameters.
    """

    name: str
    consensus: bool
    sparsification: Sparsification
    normalize: bool
    rescale: bool
    paper: str

    def source_params(self) -> dict[str, float]:
        """Per-source parameters it reads, with defaults (``weight`` first)."""
        return {"weight": 1.0, **self.sparsification.params}

    def params(self) -> dict[str, float | bool]:
        """Method-level parameters it reads, with defaults."""
        rescale = {} if self.sparsification is NONE else {"rescale": self.rescale}
        return {"normalize": self.normalize, **rescale, "lambda": LAMBDA_DEFAULT}

    def ignored_source_params(self) -> dict[str, float]:
        """Per-source parameters mergekit accepts for it that change nothing (density
        without sparsification), with mergekit's defaults."""
        return {"density": DENSITY_DEFAULT} if self.sparsification is NONE else {}

    def ignored_params(self) -> dict[str, float | bool]:
        """Method-level parameters mergekit accepts for it that change nothing, with
        mergekit's defaults: ``int8_mask`` (a memory option), and rescale without sparsification."""
        rescale = {"rescale": self.rescale} if self.sparsification is NONE else {}
        return {**rescale, "int8_mask": False}


TASK_ARITHMETIC = FamilyRow("task_arithmetic", False, NONE, normalize=False, rescale=False,
                            paper="https://arxiv.org/abs/2212.04089")
TIES = FamilyRow("ties", True, MAGNITUDE, normalize=True, rescale=False, paper="https://arxiv.org/abs/2306.01708")
DARE_TIES = FamilyRow("dare_ties", True, RANDOM, normalize=False, rescale=True, paper="https://arxiv.org/abs/2311.03099")
DARE_LINEAR = FamilyRow("dare_linear", False, RANDOM, normalize=False, rescale=True,
                        paper="https://arxiv.org/abs/2311.03099")
BREADCRUMBS = FamilyRow("breadcrumbs", False, OUTLIERS, normalize=False, rescale=False,
                        paper="https://arxiv.org/abs/2312.06795")
BREADCRUMBS_TIES = FamilyRow("breadcrumbs_ties", True, OUTLIERS, normalize=False, rescale=False,
                             paper="https://arxiv.org/abs/2312.06795")
DELLA_TIES = FamilyRow("della", True, DELLA, normalize=True, rescale=True, paper="https://arxiv.org/abs/2406.11617")
DELLA_LINEAR = FamilyRow("della_linear", False, DELLA, normalize=False, rescale=True,
                         paper="https://arxiv.org/abs/2406.11617")

#: name -> row, in mergekit's registry order.
FAMILY: Mapping[str, FamilyRow] = MappingProxyType({r.name: r for r in (
    TASK_ARITHMETIC, TIES, DARE_TIES, DARE_LINEAR, BREADCRUMBS, BREADCRUMBS_TIES, DELLA_TIES, DELLA_LINEAR)})
#: Methods that read :class:`evomerge.merge.scratch.PreparedDeltas` (the rank-based sparsifiers).
USES_SORTED_MAGNITUDES = frozenset(r.name for r in FAMILY.values() if r.sparsification.ranked)
