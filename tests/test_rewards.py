"""Rewards, table-driven against method.md 4.1 (exact values; float32 output: rtol 1e-6)."""

import math

import numpy as np
import pytest

from cqr_jax.rewards import RewardConfig, compute_rewards, rank_summary

# (format_ok, rank, expected) for the paper's reward (RIRS + format penalty).
RIRS_TABLE = [
    (True, 1, 2.0), (True, 2, 17 / 9), (True, 5, 14 / 9), (True, 10, 1.0),
    (True, 11, 89 / 90), (True, 11, 0.98888889), (True, 50, 50 / 90), (True, 99, 1 / 90),
    (True, 100, 0.0), (True, -1, 0.0), (True, 0, 0.0), (True, 101, 0.0),
    (False, 1, -0.1), (False, 10, -0.1), (False, 57, -0.1), (False, -1, -0.1),
]


@pytest.mark.parametrize("ok,rank,expected", RIRS_TABLE)
def test_rirs_table(ok, rank, expected):
  out = compute_rewards(np.array([ok]), np.array([rank]))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0], expected, rtol=1e-6, atol=1e-7)


def test_rirs_vectorised_and_monotone():
  ranks = np.arange(1, 101)
  r = compute_rewards(np.ones(100, bool), ranks)
  assert np.all(np.diff(r) < 0)
  np.testing.assert_allclose(r[[0, 9, 10, 99]], [2.0, 1.0, 89 / 90, 0.0], rtol=1e-6)


@pytest.mark.parametrize("kind,rank,golds,expected", [
    ("exponential", 1, 1, 1.0), ("exponential", 3, 1, math.exp(-2)), ("exponential", -1, 1, 0.0),
    ("reciprocal", 1, 1, 1.0), ("reciprocal", 4, 1, 0.25), ("reciprocal", -1, 1, 0.0),
    ("mrr", 50, 1, 0.02), ("mrr", 101, 1, 0.0),
    ("ndcg@3", 1, 1, 1.0), ("ndcg@3", 2, 1, 1 / math.log2(3)), ("ndcg@3", 3, 1, 0.5),
    ("ndcg@3", 4, 1, 0.0), ("ndcg@3", 1, 2, 1 / (1 + 1 / math.log2(3))),
    ("ndcg@3", 2, 5, (1 / math.log2(3)) / (1 + 1 / math.log2(3) + 0.5)),
    ("recall@10", 10, 1, 1.0), ("recall@10", 11, 1, 0.0), ("recall@10", 3, 2, 0.5),
    ("recall@100", 100, 1, 1.0), ("recall@100", -1, 1, 0.0), ("recall@100", 40, 4, 0.25),
])
def test_alternative_kinds(kind, rank, golds, expected):
  cfg = RewardConfig(kind=kind)
  out = compute_rewards([True, False], [rank, rank], cfg, num_golds=[golds, golds])
  np.testing.assert_allclose(out, [expected, -0.1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("step,rank,expected", [
    (0, 1, 1.0), (24, 50, 1 - 49 / 99), (24, 100, 0.0), (24, -1, -0.2),
    (25, 1, 1.0), (25, 10, 1 - 9 / 99), (25, 11, 0.0), (99, 50, 0.0), (99, -1, -0.2),
])
def test_curriculum(step, rank, expected):
  cfg = RewardConfig(kind="curriculum")
  out = compute_rewards([True, False], [rank, rank], cfg, step=step, total_steps=100)
  np.testing.assert_allclose(out, [expected, -0.1], rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="needs step and total_steps"):
    compute_rewards([True], [1], cfg)


def test_bad_input_is_named():
  with pytest.raises(KeyError, match="unknown reward kind 'rank'"):
    RewardConfig(kind="rank")
  with pytest.raises(ValueError, match=r"format_ok \(2,\) and ranks \(3,\)"):
    compute_rewards([True, True], [1, 2, 3])
  with pytest.raises(ValueError, match="ranks must be integers"):
    compute_rewards([True], [1.5])
  with pytest.raises(ValueError, match="num_golds must be"):
    compute_rewards([True], [1], RewardConfig(kind="recall@10"), num_golds=[0])
  assert compute_rewards([True], [1], num_golds=[0])[0] == 2.0  # rirs ignores num_golds
  assert compute_rewards([], np.array([], np.int64)).shape == (0,)


def test_rank_summary():
  s = rank_summary([True, True, True, True, False], [1, 3, 20, -1, 1])
  assert s["format_pass"] == pytest.approx(0.8)
  assert s["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 20) / 5)
  assert (s["rank_1"], s["rank_2_3"], s["rank_4_10"], s["rank_11_100"]) == (0.2, 0.2, 0.0, 0.2)
  assert (s["not_found"], s["format_fail"]) == (0.2, 0.2)
