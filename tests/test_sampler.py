"""The rollout engine on tiny random Qwen2 / Llama models: greedy parity with transformers'
`generate`, sampling distribution, log-probs, EOS / stop handling, meshes, bucketing, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cqr_jax.models.hf_import import load_hf
from cqr_jax.models.tiny_hf import save_tiny_hf
from cqr_jax.sampler import (
  TRACE_COUNT,
  Rollouts,
  Sampler,
  SamplerConfig,
  bucket,
  compaction_stages,
  find_stop,
)
from cqr_jax import decode_policy
from cqr_jax.decode_policy import DecodePolicy
from cqr_jax.shared_prefix import split_prompts
from cqr_jax.sharding import MeshConfig, make_mesh
from cqr_jax.testing import tiny_tokenizer

torch = pytest.importorskip("torch")

PROMPTS = [[5, 17, 33, 9, 71, 4, 12, 88, 21, 40, 3], [7, 90, 2 + 60], [11, 45, 23, 67, 30, 99]]
EOS = 2


# Tests share compiled shapes (4 prompt rows, n = 3, prompt bucket 16 or 32, 16 new tokens) to
# keep the suite within its time budget; distribution tests use their own large n.
BASE = dict(max_prompt_len=32, max_new_tokens=16, temperature=0.0, n=3, eos_ids=(EOS,),
            batch_buckets=(4,))


def _load(tmp_path_factory, family, seed):
  path = tmp_path_factory.mktemp(family)
  hf = save_tiny_hf(path, family, seed=seed, vocab_size=512)  # holds the tiny tokenizer's vocab
  model, cfg = load_hf(path, mesh=make_mesh(MeshConfig(), jax.devices()[:1]))
  return path, hf, model, cfg


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  return _load(tmp_path_factory, "qwen2", 5)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  return _load(tmp_path_factory, "llama", 3)


def _sampler(**kw):
  """A Sampler with the CPU policy; DecodePolicy fields among `kw` (None: the CPU default)
  replace the policy's."""
  names = {f.name for f in dataclasses.fields(DecodePolicy)}
  policy = {k: kw.pop(k) for k in list(kw) if k in names}
  policy = dataclasses.replace(decode_policy.CPU,
                               **{k: v for k, v in policy.items() if v is not None})
  return Sampler(SamplerConfig(**{**BASE, **kw}), pad_id=0, policy=policy)


def _hf_greedy(hf, prompts, max_new, eos):
  width = max(map(len, prompts))
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1
  with torch.no_grad():
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                      eos_token_id=eos, pad_token_id=0, min_new_tokens=0)
  rows = []
  for row in out[:, width:].tolist():
    rows.append(row[:row.index(eos) + 1] if eos in row else row)
  return rows


# attention None is "reduce" here (CPU); "matmul" is the einsum form other backends use. scan:
# the blocks as one lax.scan (stacked prompt and generation caches); None = the CPU default
# (unrolled) for a model whose config asks for the scan.
@pytest.mark.parametrize("family,scan,attention", [
    ("qwen2", False, None), ("llama", False, None), ("llama", True, None), ("llama", None, None),
    ("qwen2", False, "matmul"), ("llama", True, "matmul")])
def test_greedy_matches_transformers_generate(family, scan, attention, request):
  path, hf, model, _ = request.getfixturevalue("qwen" if family == "qwen2" else "llama")
  if scan is not False:
    model, _ = load_hf(path, mesh=make_mesh(MeshConfig(), jax.devices()[:1]), scan_layers=True)
  r = _sampler(attention=attention, scan_layers=scan).generate(model, PROMPTS,
                                                                       key=jax.random.key(0))
  want = _hf_greedy(hf, PROMPTS, 16, EOS)
  assert [r.completion_tokens(3 * i) for i in range(len(PROMPTS))] == want
  assert [r.completion_tokens(3 * i + 2) for i in range(len(PROMPTS))] == want
  for i, w in enumerate(want):
    assert r.finish_reasons[3 * i] == ("eos" if w[-1] == EOS else "length")


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_same_on_8_devices_as_on_1(qwen, scan):
  path, _, model1, _ = qwen
  mesh8 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  model8, _ = load_hf(path, mesh=mesh8, scan_layers=scan)
  r1 = _sampler().generate(model1, PROMPTS, key=jax.random.key(0))
  r8 = Sampler(_sampler().config, mesh=mesh8, pad_id=0).generate(model8, PROMPTS,
                                                                  key=jax.random.key(0))
  np.testing.assert_array_equal(r1.completion_ids, r8.completion_ids)
  np.testing.assert_array_equal(r1.completion_mask, r8.completion_mask)
  np.testing.assert_allclose(r1.logprobs, r8.logprobs, atol=1e-5)


# Prompts that begin with the same 40 tokens (a template's instructions): the prompt pass runs
# the first 32 once (SamplerConfig.shared_prefix_min 32; 40 rounded down to a multiple of 16).
_HEAD = [int(t) for t in np.random.default_rng(7).integers(3, 500, 40)]
SHARED = [_HEAD + [5, 17, 33], _HEAD + [7, 90, 62, 11, 45, 23, 67, 30, 99, 12, 8], _HEAD + [4] * 6]
# Prompts padded to 80: the 32-token prefix, then remainders of up to 19 tokens in 80 - 32
# columns (shared_prefix.split_prompts: one width per bucket).
SHARED_BASE = dict(max_prompt_len=80, prompt_len_buckets=(80,), shared_prefix_min=32)


def test_split_prompts():
  ids, mask = np.zeros((4, 8), np.int32), np.zeros((4, 8), bool)
  for i, p in enumerate([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9], [1, 2, 3, 4, 5, 6, 7, 8]]):
    ids[i, 8 - len(p):], mask[i, 8 - len(p):] = p, True
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr("cqr_jax.shared_prefix.MULTIPLE", 2)
    out, m, s = split_prompts(ids, mask, 3, 2, pad_id=0)
    assert s == 4  # common prefix [1, 2, 3, 4]; the shortest prompt keeps its last token
    # The prefix in every row (padding row 3 too), then each remainder, left-padded.
    np.testing.assert_array_equal(out, [[1, 2, 3, 4, 0, 0, 5, 6], [1, 2, 3, 4, 0, 0, 0, 9],
                                        [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 0, 0, 0, 0]])
    np.testing.assert_array_equal(m, (out > 0))
    # A prefix shorter than the minimum, a single prompt, or 0 (off): the plain layout.
    for count, least in [(3, 6), (1, 2), (3, 0)]:
      out, m, s = split_prompts(ids, mask, count, least, pad_id=0)
      assert s == 0 and out is ids and m is mask
    # The prefix is rounded down to the multiple and ends before the shortest prompt's end.
    same = np.tile(ids[2], (2, 1)), np.tile(mask[2], (2, 1))
    assert split_prompts(*same, 2, 2, pad_id=0)[2] == 6
  # One width per prompt bucket: the prefix, then every remainder left-padded to P - S, however
  # long the call's longest remainder is (one compiled program per bucket).
  head = list(range(1, 33))
  for p_len, longest in [(80, 10), (80, 46), (208, 100), (208, 170)]:
    ids, mask = np.zeros((3, p_len), np.int32), np.zeros((3, p_len), bool)
    for i, p in enumerate([head + [40] * 3, head + [50] * longest]):
      ids[i, p_len - len(p):], mask[i, p_len - len(p):] = p, True
    out, m, s = split_prompts(ids, mask, 2, 16, pad_id=0)
    assert s == 32 and out.shape == m.shape == (3, p_len), (longest, out.shape)
    np.testing.assert_array_equal(out[0][m[0]], head + [40] * 3)
    np.testing.assert_array_equal(out[1][m[1]], head + [50] * longest)
    np.testing.assert_array_equal(m[:, -1], [True, True, False])  # left-padded remainders
    np.testing.assert_array_equal(m[:, 32:p_len - longest].any(), False)


@pytest.mark.parametrize("family,scan,attention", [
    ("qwen2", False, None), ("llama", True, None), ("qwen2", False, "matmul")])
def test_shared_prefix_greedy_matches_transformers_generate(family, scan, attention, request):
  path, hf, model, _ = request.getfixturevalue("qwen" if family == "qwen2" else "llama")
  if scan:
    model, _ = load_hf(path, mesh=make_mesh(MeshConfig(), jax.devices()[:1]), scan_layers=True)
  s = _sampler(**SHARED_BASE, attention=attention, scan_layers=scan)
  r = s.generate(model, SHARED, key=jax.random.key(0))
  assert s.last_timing["shared_prefix"] == 32
  ids, mask, _ = s.prepare(SHARED)
  assert ids.shape[1] == 80 and split_prompts(ids, mask, 3, 32, 0)[0].shape[1] == 80
  want = _hf_greedy(hf, SHARED, 16, EOS)
  assert [r.completion_tokens(3 * i) for i in range(len(SHARED))] == want
  # The returned prompts are the plain left-padded ones, whatever the prompt pass ran over.
  for i, p in enumerate(SHARED):
    assert r.prompt_ids[3 * i][r.prompt_mask[3 * i]].tolist() == p


@pytest.mark.parametrize("attention", [None, "matmul"])
def test_shared_prefix_sampling_equals_plain(qwen, attention):
  """Running the common prefix once samples the same tokens with the same log-probs."""
  _, _, model, _ = qwen
  runs = []
  for spm in (0, 32):
    s = _sampler(**{**SHARED_BASE, "shared_prefix_min": spm}, temperature=0.7,
                 max_new_tokens=12, ignore_eos=True, attention=attention)
    runs.append(s.generate(model, SHARED, key=jax.random.key(6)))
    assert s.last_timing["shared_prefix"] == spm
  np.testing.assert_array_equal(runs[0].completion_ids, runs[1].completion_ids)
  np.testing.assert_allclose(runs[0].logprobs, runs[1].logprobs, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_shared_prefix_same_on_8_devices_as_on_1(qwen, scan):
  path, _, model1, _ = qwen
  mesh8 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  model8, _ = load_hf(path, mesh=mesh8, scan_layers=scan)
  s1 = _sampler(**SHARED_BASE)
  s8 = _sampler(**SHARED_BASE, scan_layers=scan)
  s8 = Sampler(s8.config, mesh=mesh8, pad_id=0, policy=s8.policy)
  r1 = s1.generate(model1, SHARED, key=jax.random.key(0))
  r8 = s8.generate(model8, SHARED, key=jax.random.key(0))
  assert s8.last_timing["shared_prefix"] == 32
  np.testing.assert_array_equal(r1.completion_ids, r8.completion_ids)
  np.testing.assert_allclose(r1.logprobs, r8.logprobs, atol=1e-5)


def _first_token_probs(model, prompt, temperature):
  t = jnp.asarray([prompt])
  logits = np.asarray(model(t, jnp.arange(len(prompt))[None], jnp.ones_like(t))[0, -1], np.float64)
  z = logits / temperature
  e = np.exp(z - z.max())
  return e / e.sum()


def _chi2(tokens, p, min_expected=5.0):
  """Chi-square p-value of token counts vs probabilities p, pooling bins expected < 5."""
  counts = np.bincount(tokens, minlength=p.size).astype(np.float64)
  assert counts[p == 0].sum() == 0, "sampled a token of probability 0"
  exp = p * len(tokens)
  big = exp >= min_expected
  obs, exp = counts[big], exp[big]
  if (~big & (p > 0)).any():
    obs, exp = np.append(obs, counts[~big].sum()), np.append(exp, (p[~big] * len(tokens)).sum())
  return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_sampling_distribution_matches_softmax_over_t(qwen):
  _, _, model, _ = qwen
  prompt = [5, 17, 33]
  n = 8000
  r = _sampler(temperature=0.7, n=n, max_new_tokens=1, ignore_eos=True, batch_buckets=()).generate(
      model, [prompt], key=jax.random.key(1))
  first = r.completion_ids[:, 0]
  assert _chi2(first, _first_token_probs(model, prompt, 0.7)) > 1e-4
  # The same draws reject the wrong temperature (power of the test).
  assert _chi2(first, _first_token_probs(model, prompt, 0.8)) < 1e-6
  assert _chi2(first, _first_token_probs(model, prompt, 1.0)) < 1e-6


def test_top_k_and_top_p_stay_in_the_kept_set(qwen):
  _, _, model, _ = qwen
  prompt = [5, 17, 33]
  p = _first_token_probs(model, prompt, 0.7)
  order = np.argsort(-p)
  # top-k 8, then top-p just above the mass of the 3 most likely of the renormalised top 8:
  # exactly 4 tokens stay (an off-by-one in either filter keeps 3, 5 or 8).
  p8 = np.zeros_like(p)
  p8[order[:8]] = p[order[:8]]
  p8 /= p8.sum()
  top_p = float(np.sort(p8)[::-1][:3].sum() + 1e-4)
  r = _sampler(temperature=0.7, n=4000, max_new_tokens=1, top_k=8, top_p=top_p, ignore_eos=True,
               batch_buckets=()).generate(model, [prompt], key=jax.random.key(3))
  first = r.completion_ids[:, 0]
  assert set(first.tolist()) == set(order[:4].tolist())
  keep = np.zeros_like(p)
  keep[order[:4]] = p[order[:4]]
  assert _chi2(first, keep / keep.sum()) > 1e-4
  # Returned log-probs are the full tempered distribution's, not the truncated one's.
  np.testing.assert_allclose(r.logprobs[:, 0], np.log(p[first]), atol=2e-5)


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_logprobs_equal_forward_logprobs(qwen, temperature):
  _, _, model, _ = qwen
  r = _sampler(temperature=temperature, max_new_tokens=12, ignore_eos=True).generate(
      model, PROMPTS, key=jax.random.key(4))
  tokens = np.concatenate([r.prompt_ids, r.completion_ids], 1)
  mask = np.concatenate([r.prompt_mask, r.completion_mask], 1)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], 1)
  want = model.token_logprobs(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask),
                              jnp.asarray(targets), temperature=temperature or 1.0)
  p = r.prompt_ids.shape[1]
  want = np.asarray(want)[:, p - 1:-1]
  # f32 forward vs f32 KV-cache decode: same math, different summation order.
  np.testing.assert_allclose(r.logprobs[r.completion_mask], want[r.completion_mask], atol=1e-4)


def test_weights_first_decode_equals_activations_first(qwen):
  """The decode step's products as W x^T (the CPU default at <= 32 rows, so the transformers
  parity tests above run it) sample the same tokens with the same log-probs as x W."""
  _, _, model, _ = qwen
  runs = [_sampler(temperature=0.7, max_new_tokens=12, ignore_eos=True,
                   weights_first_rows=32 if wf else 0).generate(model, PROMPTS, key=jax.random.key(6))
          for wf in (False, True)]
  np.testing.assert_array_equal(runs[0].completion_ids, runs[1].completion_ids)
  np.testing.assert_allclose(runs[0].logprobs, runs[1].logprobs, atol=1e-5)


def test_bf16_decode_logprobs_close_to_bf16_forward(qwen):
  """bf16 compute with bf16-cast parameters and cache (the fast setting) against the model's
  own bf16 forward: same operand roundings, different summation order and cache rounding."""
  _, _, model, _ = qwen
  r = _sampler(temperature=0.7, max_new_tokens=12, ignore_eos=True,
               compute_dtype="bfloat16").generate(model, PROMPTS, key=jax.random.key(4))
  tokens = np.concatenate([r.prompt_ids, r.completion_ids], 1)
  mask = np.concatenate([r.prompt_mask, r.completion_mask], 1)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], 1)
  want = model.token_logprobs(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask),
                              jnp.asarray(targets), temperature=0.7, compute_dtype="bfloat16")
  want = np.asarray(want)[:, r.prompt_ids.shape[1] - 1:-1]
  err = np.abs(r.logprobs - want)[r.completion_mask]
  print("bf16 max abs log-prob error", err.max())
  assert err.max() < 0.1 and err.mean() < 0.02


def test_same_key_same_output_different_keys_differ(qwen):
  _, _, model, _ = qwen
  s = _sampler(temperature=0.7, ignore_eos=True)
  a = s.generate(model, PROMPTS, key=jax.random.key(7))
  b = s.generate(model, PROMPTS, key=jax.random.key(7))
  c = s.generate(model, PROMPTS, key=jax.random.key(8))
  np.testing.assert_array_equal(a.completion_ids, b.completion_ids)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.completion_ids != c.completion_ids).any()
  # The n samples of one prompt differ from each other (prompt-major rows i * n + j).
  assert len({tuple(row) for row in a.completion_ids[:3].tolist()}) > 1
  assert a.prompt_index.tolist() == [0] * 3 + [1] * 3 + [2] * 3
  assert (a.prompt_ids[3:6] == a.prompt_ids[3]).all()


def test_eos_mask_and_early_exit(qwen):
  _, _, model, _ = qwen
  free = _sampler(ignore_eos=True).generate(model, PROMPTS[:1], key=jax.random.key(0))
  eos = int(free.completion_ids[0, 3])  # make the 4th greedy token an EOS
  first = free.completion_ids[0].tolist().index(eos)
  s = _sampler(eos_ids=(eos, 127))
  r = s.generate(model, PROMPTS[:1], key=jax.random.key(0))
  assert r.finish_reasons == ["eos"] * 3
  assert r.completion_mask[0].tolist() == [True] * (first + 1) + [False] * (15 - first)
  assert r.completion_ids[0, first] == eos and (r.completion_ids[0, first + 1:] == 0).all()
  assert (r.logprobs[0, first + 1:] == 0).all()
  assert s.last_timing["steps"] == first + 1  # the loop stopped once every row was done


# EOS ids for finished-row compaction: a fifth of the tiny vocabulary ends a row, so rows of a
# 16-token call end at many different steps.
MANY_EOS = tuple(range(3, 512, 5))


@pytest.mark.parametrize("scan,attention,spm", [(False, None, 0), (True, "matmul", 32)])
def test_compacted_decode_equals_all_rows(qwen, scan, attention, spm):
  """Dropping finished rows mid-call (12 rows -> 8, 6, 4, 3, 2) samples the same tokens with the
  same log-probs as running every row to the end: each kept row keeps its caches, its prompt's
  slots and its random draws."""
  path, _, model, _ = qwen
  if scan:
    model, _ = load_hf(path, mesh=make_mesh(MeshConfig(), jax.devices()[:1]), scan_layers=True)
  runs, samplers = [], []
  for compact in (False, True):
    s = _sampler(**{**SHARED_BASE, "shared_prefix_min": spm}, temperature=0.7, eos_ids=MANY_EOS,
                 compact_min_rows=2 if compact else 0, scan_layers=scan,
                 attention=attention)
    runs.append(s.generate(model, SHARED, key=jax.random.key(11)))
    samplers.append(s)
  full, compacted = runs
  lengths = full.completion_lengths
  assert len(set(lengths[:9].tolist())) >= 4 and lengths.max() > 8  # rows end at many steps
  assert samplers[0].last_timing["decode_rows_end"] == 12
  assert samplers[1].last_timing["decode_rows_end"] < 12  # the loop did drop rows
  np.testing.assert_array_equal(full.completion_ids, compacted.completion_ids)
  np.testing.assert_array_equal(full.completion_mask, compacted.completion_mask)
  assert full.finish_reasons == compacted.finish_reasons
  np.testing.assert_allclose(full.logprobs, compacted.logprobs, atol=1e-5)


def test_compacted_decode_same_on_8_devices_as_on_1(qwen):
  """The kept rows are gathered across the data x fsdp shards (4 here: 12 rows -> 8 -> 4)."""
  path, _, model1, _ = qwen
  mesh8 = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  model8, _ = load_hf(path, mesh=mesh8)
  s1 = _sampler(temperature=0.7, eos_ids=MANY_EOS, compact_min_rows=2)
  s8 = Sampler(s1.config, mesh=mesh8, pad_id=0, policy=s1.policy)
  r1 = s1.generate(model1, PROMPTS, key=jax.random.key(3))
  r8 = s8.generate(model8, PROMPTS, key=jax.random.key(3))
  assert s8.last_timing["decode_rows_end"] in (4, 8)
  np.testing.assert_array_equal(r1.completion_ids, r8.completion_ids)
  np.testing.assert_allclose(r1.logprobs, r8.logprobs, atol=1e-5)


def test_compaction_stages():
  assert compaction_stages(64, 16, 1) == (64, 48, 32, 24, 16)
  assert compaction_stages(64, 0, 1) == (64,)
  assert compaction_stages(12, 2, 4) == (12, 8, 4)  # multiples of the data-parallel size
  assert compaction_stages(40, 8, 1) == (40, 32, 24, 16, 12, 8)
  assert compaction_stages(16, 16, 1) == (16,)


def test_prompt_param_updates_seen_without_recompile(qwen):
  _, _, model, _ = qwen
  s = _sampler(prompt_len_buckets=(16, 32))
  a = s.generate(model, [[5, 6, 7]], key=jax.random.key(0))
  traces = TRACE_COUNT[0]
  s.generate(model, [[5, 6, 7, 8, 9, 10, 11]], key=jax.random.key(0))  # same bucket (16)
  old = model.final_norm.scale[...]
  model.final_norm.scale[...] = -old  # the trainer updating parameters in place
  b = s.generate(model, [[5, 6, 7]], key=jax.random.key(0))
  model.final_norm.scale[...] = old
  assert TRACE_COUNT[0] == traces
  assert (a.completion_ids != b.completion_ids).any()


def test_chat_prompts_texts_and_stop_strings(qwen):
  _, _, model, cfg = qwen
  tok = tiny_tokenizer("chatml", vocab_size=cfg.vocab_size)
  chats = [[{"role": "user", "content": "Who wrote the novel?"}],
           [{"role": "system", "content": "Rewrite."}, {"role": "user", "content": "the castle"}]]
  s = Sampler(SamplerConfig(**{**BASE, "eos_ids": ()}), tok)
  r = s.generate(model, chats, key=jax.random.key(0))
  ids0 = tok.apply_chat_template(chats[0], add_generation_prompt=True, tokenize=True)["input_ids"]
  assert r.prompt_ids[0][r.prompt_mask[0]].tolist() == list(ids0)
  assert s.eos_ids_for(cfg) == tuple(sorted({tok.eos_token_id, *cfg.eos_token_ids}))
  for i in range(6):
    assert r.texts[i] == tok.decode(r.completion_tokens(i), skip_special_tokens=True)
  # A stop string taken from the middle of the greedy text ends the completion there.
  full = r.texts[0]
  stop = full[len(full) // 2:len(full) // 2 + 3]
  s2 = Sampler(SamplerConfig(**{**BASE, "eos_ids": (), "stop_strings": (stop,)}), tok)
  r2 = s2.generate(model, chats, key=jax.random.key(0))
  assert r2.finish_reasons[:3] == ["stop"] * 3
  assert r2.texts[0] == full[:full.index(stop)]
  k = r2.completion_lengths[0]
  assert stop in tok.decode(r2.completion_tokens(0))
  assert stop not in tok.decode(r.completion_tokens(0)[:k - 1])
  assert r2.completion_ids[0, :k].tolist() == r.completion_ids[0, :k].tolist()


def test_find_stop_shortest_prefix():
  tok = tiny_tokenizer("chatml")
  ids = tok("the quick brown fox jumps over the lazy dog")["input_ids"]
  k, text = find_stop(ids, ["fox", "lazy"], tok)
  assert "fox" in tok.decode(ids[:k]) and "fox" not in tok.decode(ids[:k - 1])
  assert text == "the quick brown "
  assert find_stop(ids, ["cat"], tok) is None


def test_truncate_prompt_left(qwen):
  _, _, model, _ = qwen
  long = list(range(3, 43))  # 40 tokens > 32
  with pytest.raises(ValueError, match=r"prompts\[1\] has 40 tokens > max_prompt_len=32"):
    _sampler().generate(model, [[4, 5], long], key=jax.random.key(0))
  s = _sampler(truncate_prompt_left=True)
  r = s.generate(model, [[4, 5], long], key=jax.random.key(0))
  assert r.prompt_truncated.tolist() == [False, True]
  assert r.prompt_ids[3][r.prompt_mask[3]].tolist() == long[-32:]
  ref = s.generate(model, [long[-32:]], key=jax.random.key(0))
  np.testing.assert_array_equal(r.completion_ids[3], ref.completion_ids[0])


@pytest.mark.parametrize("prompts,kw,msg", [
    ([[4, 5], []], {}, r"prompts\[1\] is empty"),
    ([], {}, "prompts is empty"),
    ([[4, 5]], {"n": 0}, "n .* must be an int >= 1"),
    ([[4, 5]], {"temperature": -0.5}, "temperature must be >= 0"),
    ([[4, 5]], {"top_p": 0.0}, "top_p"),
    ([[4, 512]], {}, r"prompts\[0\] has token id 512 outside the vocabulary"),
    (["hello"], {}, r"prompts\[0\] is a str"),
    ([[{"role": "user", "content": "hi"}]], {}, "no tokenizer"),
    ([[4, 5]], {"max_new_tokens": 17}, "max_new_tokens=17"),
])
def test_bad_input_errors(qwen, prompts, kw, msg):
  _, _, model, _ = qwen
  with pytest.raises(ValueError, match=msg):
    _sampler().generate(model, prompts, key=jax.random.key(0), **kw)  # no compile: fails first


def test_bad_config_errors():
  with pytest.raises(ValueError, match="SamplerConfig.n"):
    SamplerConfig(n=0)
  with pytest.raises(ValueError, match="temperature"):
    SamplerConfig(temperature=-1.0)
  with pytest.raises(ValueError, match="prompt_len_buckets"):
    SamplerConfig(prompt_len_buckets=(64, 32))
  with pytest.raises(ValueError, match="compact_min_rows"):
    DecodePolicy(compact_min_rows=-1)
  with pytest.raises(ValueError, match="attention='einsum'"):
    DecodePolicy(attention="einsum")


def test_bucket():
  assert bucket(3, (16, 32), "x") == 16 and bucket(17, (16, 32), "x") == 32
  with pytest.raises(ValueError, match="x=33 exceeds the largest bucket 32"):
    bucket(33, (16, 32), "x")


def test_rollouts_is_the_documented_dataclass():
  assert {f for f in Rollouts.__dataclass_fields__} >= {
      "prompt_ids", "completion_ids", "completion_mask", "logprobs", "finish_reasons", "texts"}
