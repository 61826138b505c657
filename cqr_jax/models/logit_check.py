"""Comparing two models' logits token by token: the check behind every export and import test.

Besides the max absolute difference (meaningful for same-precision parity), lower-precision copies
(a bf16 export) are judged the way MaxText's checkpoint checker does: per real token the KL
divergence KL(p_ref || p_test) of the softmax distributions, the overlap of the top-k token sets,
and whether the argmax agrees.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LogitReport:
  """Statistics over the real (mask = 1) tokens; KL in nats."""
  n_tokens: int
  k: int
  max_abs: float
  mean_abs: float
  kl_max: float
  kl_mean: float
  topk_overlap_min: float  # min over tokens of |topk(ref) & topk(test)| / k
  topk_overlap_mean: float
  argmax_agree: float  # fraction of tokens whose argmax agrees

  def __str__(self):
    return (f"{self.n_tokens} tokens: max|d|={self.max_abs:.3g} mean|d|={self.mean_abs:.3g} "
            f"KL max={self.kl_max:.3g} mean={self.kl_mean:.3g} top{self.k} overlap "
            f"min={self.topk_overlap_min:.3f} mean={self.topk_overlap_mean:.3f} "
            f"argmax agree={self.argmax_agree:.3f}")


def _log_softmax(z_nv: np.ndarray) -> np.ndarray:
  z_nv = z_nv - z_nv.max(-1, keepdims=True)
  return z_nv - np.log(np.exp(z_nv).sum(-1, keepdims=True))


def compare_logits(ref_btv, test_btv, mask_bt=None, *, k: int = 10) -> LogitReport:
  """Statistics of `test` against `ref` ([B, T, V] or [N, V]) over tokens where mask_bt > 0."""
  ref = np.asarray(ref_btv, np.float64)
  test = np.asarray(test_btv, np.float64)
  if ref.shape != test.shape:
    raise ValueError(f"logit shapes differ: ref {ref.shape} vs test {test.shape}")
  v = ref.shape[-1]
  ref, test = ref.reshape(-1, v), test.reshape(-1, v)
  if mask_bt is not None:
    keep = np.asarray(mask_bt).reshape(-1) > 0
    ref, test = ref[keep], test[keep]
  if len(ref) == 0:
    raise ValueError("no real tokens to compare (mask is all zero)")
  diff = np.abs(ref - test)
  lp_ref, lp_test = _log_softmax(ref), _log_softmax(test)
  kl_n = np.sum(np.exp(lp_ref) * (lp_ref - lp_test), axis=-1)
  k = min(k, v)
  top_ref = np.argpartition(-ref, k - 1, axis=-1)[:, :k]
  top_test = np.argpartition(-test, k - 1, axis=-1)[:, :k]
  overlap_n = np.array([len(np.intersect1d(a, b)) / k for a, b in zip(top_ref, top_test)])
  agree = np.mean(ref.argmax(-1) == test.argmax(-1))
  return LogitReport(n_tokens=len(ref), k=k, max_abs=float(diff.max()),
                     mean_abs=float(diff.mean()), kl_max=float(kl_n.max()),
                     kl_mean=float(kl_n.mean()), topk_overlap_min=float(overlap_n.min()),
                     topk_overlap_mean=float(overlap_n.mean()), argmax_agree=float(agree))


def check_logits(ref_btv, test_btv, mask_bt=None, *, k: int = 10, atol: float | None = None,
                 kl_max: float | None = None, kl_mean: float | None = None,
                 topk_overlap_mean: float | None = None,
                 argmax_agree: float | None = None) -> LogitReport:
  """`compare_logits`, raising AssertionError (with the full report) if any given bound fails."""
  rep = compare_logits(ref_btv, test_btv, mask_bt, k=k)
  fails = []
  if atol is not None and rep.max_abs > atol:
    fails.append(f"max|d|={rep.max_abs:.3g} > atol={atol}")
  if kl_max is not None and rep.kl_max > kl_max:
    fails.append(f"KL max={rep.kl_max:.3g} > {kl_max}")
  if kl_mean is not None and rep.kl_mean > kl_mean:
    fails.append(f"KL mean={rep.kl_mean:.3g} > {kl_mean}")
  if topk_overlap_mean is not None and rep.topk_overlap_mean < topk_overlap_mean:
    fails.append(f"top{rep.k} overlap mean={rep.topk_overlap_mean:.3f} < {topk_overlap_mean}")
  if argmax_agree is not None and rep.argmax_agree < argmax_agree:
    fails.append(f"argmax agree={rep.argmax_agree:.3f} < {argmax_agree}")
  if fails:
    raise AssertionError("logit check failed: " + "; ".join(fails) + f"\n  {rep}")
  return rep
