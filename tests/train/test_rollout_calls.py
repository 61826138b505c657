"""GRPO's rollouts in several sampler calls (`rollout.prompts_per_call`, train/grpo.py
`sample_in_calls`): prompt-major order kept, each call's draws its own, prompts re-padded."""

import jax
import numpy as np
import pytest

from cqr_jax.models.hf_import import load_hf
from cqr_jax.models.tiny_hf import save_tiny_hf
from cqr_jax.sampler import Rollouts, Sampler, SamplerConfig
from cqr_jax.sharding import MeshConfig, make_mesh
from train.grpo import sample_in_calls

# Prompts of 11, 3, 6 and 14 tokens: the two calls pad their prompts to different widths.
PROMPTS = [[5, 17, 33, 9, 71, 4, 12, 88, 21, 40, 3], [7, 90, 62], [11, 45, 23, 67, 30, 99],
           [8, 6, 4, 2 + 1, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59]]
N = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  path = tmp_path_factory.mktemp("qwen2")
  save_tiny_hf(path, "qwen2", seed=5, vocab_size=512)
  model, _ = load_hf(path, mesh=make_mesh(MeshConfig(), jax.devices()[:1]))
  sampler = Sampler(SamplerConfig(max_prompt_len=32, max_new_tokens=8, temperature=1.0, n=N,
                                  batch_buckets=(2,), prompt_len_buckets=(8, 16)), pad_id=0)
  return model, sampler


def _prompt_rows(roll):
  return [roll.prompt_ids[r][roll.prompt_mask[r]].tolist() for r in range(len(roll.texts))]


def test_calls_keep_prompt_order_and_draw_per_call(setup):
  model, sampler = setup
  key = jax.random.key(3)
  roll = sample_in_calls(sampler, model, PROMPTS, key, N, per_call=2)
  assert len(roll.texts) == len(PROMPTS) * N and roll.num_prompts == len(PROMPTS)
  assert roll.prompt_ids.shape[1] == 16  # the wider call's bucket
  assert _prompt_rows(roll) == [p for p in PROMPTS for _ in range(N)]
  for c, lo in enumerate((0, 2)):  # each call = that call alone, with its folded key
    alone = sampler.generate(model, PROMPTS[lo:lo + 2], key=jax.random.fold_in(key, c), n=N)
    rows = slice(lo * N, (lo + 2) * N)
    np.testing.assert_array_equal(roll.completion_ids[rows], alone.completion_ids)
    np.testing.assert_array_equal(roll.logprobs[rows], alone.logprobs)
    assert _prompt_rows(alone) == _prompt_rows(roll)[rows]
  # the two calls draw differently: the same two prompts under each call's key differ
  a = sampler.generate(model, PROMPTS[:2], key=jax.random.fold_in(key, 0), n=N)
  b = sampler.generate(model, PROMPTS[:2], key=jax.random.fold_in(key, 1), n=N)
  assert not np.array_equal(a.completion_ids, b.completion_ids)


def test_one_call_when_off_or_covering_the_step(setup):
  model, sampler = setup
  key = jax.random.key(4)
  whole = sampler.generate(model, PROMPTS[:2], key=key, n=N)
  for per_call in (0, 2, 5):
    got = sample_in_calls(sampler, model, PROMPTS[:2], key, N, per_call)
    np.testing.assert_array_equal(got.completion_ids, whole.completion_ids)


def test_concat_refuses_mismatched_calls(setup):
  model, sampler = setup
  a = sampler.generate(model, PROMPTS[:2], key=jax.random.key(0), n=N)
  b = sampler.generate(model, PROMPTS[:2], key=jax.random.key(0), n=1)
  with pytest.raises(ValueError, match="differ in n"):
    Rollouts.concat([a, b], pad_id=0)
