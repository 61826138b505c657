"""Retrieval for cqr-jax: BM25 (rank_bm25-exact and Lucene-style), gold-passage ranks for the
reward, IR metrics. Dense retrieval lives in `retrieval.dense_*` (imported on demand: it pulls jax).

The library `cqr_jax` never imports this package; the programs in `train/` do.
"""

from retrieval.bm25 import (BM25Params, ExactOkapiBM25, LuceneBM25, QRECC_K1_B, RankBM25Searcher,
                            TOPIOCQA_K1_B, build_bm25, okapi_params)
from retrieval.gold_rank import NOT_FOUND, GoldRanker, truncate_words
from retrieval.index_io import load_index as load_bm25
from retrieval.index_io import save_index as save_bm25
from retrieval.metrics import ALL_METRICS, PAPER_METRICS, evaluate, mean_metrics
from retrieval.searcher import Searcher

__all__ = [
    "ALL_METRICS", "BM25Params", "ExactOkapiBM25", "GoldRanker", "LuceneBM25", "NOT_FOUND",
    "PAPER_METRICS", "QRECC_K1_B", "RankBM25Searcher", "Searcher", "TOPIOCQA_K1_B", "build_bm25",
    "evaluate", "load_bm25", "mean_metrics", "okapi_params", "save_bm25", "truncate_words",
]
