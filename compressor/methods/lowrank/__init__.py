"""`lowrank`: W = A @ B. The method (`method`), its decompositions (`factors`), its modules
(`modules`) and its sequential correction (`sequential`)."""

from compressor.methods.lowrank.factors import LowRankFactors, decompose
from compressor.methods.lowrank.method import RANK_MULTIPLE, LowRank, LowRankOptions
from compressor.methods.lowrank.modules import LowRankWeight

__all__ = ["RANK_MULTIPLE", "LowRank", "LowRankFactors", "LowRankOptions", "LowRankWeight",
           "decompose"]
