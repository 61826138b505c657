"""Prompt rendering (method.md 2.1-2.3, 2.5) against golden strings, templates, truncation."""

import datetime
import json
import os
import re

import pytest

from cqr_jax.data.types import Turn
from cqr_jax.prompts import PromptBuilder
from cqr_jax.testing import tiny_tokenizer, tokenizer_from_config

INSTRUCTION = (
    "Below is a user's query and the conversation that came before it. First think it through in "
    "your mind: work out what the query refers to by resolving pronouns and other references and "
    "by filling in anything the user left out, using the context. Then write a rewrite of the "
    "query that stands on its own, keeps the user's meaning, and carries enough detail for a "
    "search engine to find relevant passages. Put your thinking and your rewrite inside tags, in "
    "this format: <think> reasoning process here </think>\n<rewrite> rewrite here </rewrite>.")

# A 3-turn conversation: the prompt of its third turn shows the first two.
TURN3 = Turn(conv_id="c1", turn_id=3, qid="q3", question="Who designed it?",
             context=(("Where is Varnholt Castle?", "Above the town of Ostby."),
                      ("When was it built?", None)))  # no answer: Q line only

PROMPT3 = (INSTRUCTION + "\n\n### Context Begin ###\n"
           "Q1: Where is Varnholt Castle?\nA1: Above the town of Ostby.\nQ2: When was it built?\n"
           "### Context End ###\n\nQuery: Who designed it?\nRewrite:")

FIRST = Turn(conv_id="c1", turn_id=1, qid="q1", question="Where is Varnholt Castle?")
PROMPT1 = (INSTRUCTION + "\n\n### Context Begin ###\n\n### Context End ###\n\n"
           "Query: Where is Varnholt Castle?\nRewrite:")


def test_text_golden():
  pb = PromptBuilder()
  assert pb.text(TURN3) == PROMPT3
  assert pb.text(FIRST) == PROMPT1  # empty context block -> an empty line
  assert pb.messages(TURN3) == [{"role": "user", "content": PROMPT3}]


def test_chatml_golden():
  tok = tiny_tokenizer("chatml")
  pb = PromptBuilder()
  want = "<|im_start|>user\n" + PROMPT3 + "<|im_end|>\n<|im_start|>assistant\n"
  assert pb.chat_text(TURN3, tok) == want
  ids = pb.token_ids(TURN3, tok)
  assert ids == tok(want, add_special_tokens=False)["input_ids"]
  assert tok.decode(ids) == want


def test_llama3_golden():
  tok = tiny_tokenizer("llama3")
  pb = PromptBuilder()
  want = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + PROMPT3
          + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
  assert pb.chat_text(TURN3, tok) == want
  ids = pb.token_ids(TURN3, tok)
  # BOS comes from the template exactly once (add_special_tokens=False: method.md 2.3).
  assert ids.count(tok.convert_tokens_to_ids("<|begin_of_text|>")) == 1
  assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
  assert tok.decode(ids) == want


def test_few_shot_structure():
  pb = PromptBuilder(few_shot=True)
  text = pb.text(TURN3)
  assert text.startswith(INSTRUCTION + "\n")
  head, rest = text.split("### Example Begin ###\n")
  example, tail = rest.split("\n### Example End ###\n\n")
  assert "<think>" in example
  assert "<rewrite> When was the Eiffel Tower finished? </rewrite>" in example
  assert tail == PROMPT3[len(INSTRUCTION) + 2:]  # same context/query block as zero-shot
  custom = PromptBuilder(few_shot=True, example="EXAMPLE").text(TURN3)
  assert "### Example Begin ###\nEXAMPLE\n### Example End ###" in custom


def test_template_from_file(tmp_path):
  p = tmp_path / "t.txt"
  p.write_text("Rewrite it.\n[{context}]\nQ={query}\nRewrite:\n")  # one trailing newline dropped
  pb = PromptBuilder(template=p)
  assert pb.text(TURN3) == ("Rewrite it.\n[Q1: Where is Varnholt Castle?\nA1: Above the town of "
                            "Ostby.\nQ2: When was it built?]\nQ=Who designed it?\nRewrite:")
  # placeholders inside the values are not substituted again
  t = Turn(conv_id="c", turn_id=2, qid="q", question="{context}?", context=(("{query}", "a"),))
  want = "Rewrite it.\n[Q1: {query}\nA1: a]\nQ={context}?\nRewrite:"
  assert PromptBuilder(template=p).text(t) == want


def test_template_errors(tmp_path):
  p = tmp_path / "bad.txt"
  p.write_text("no placeholders here")
  with pytest.raises(ValueError, match=r"bad.txt.*\{context\}, \{query\}"):
    PromptBuilder(template=p)
  p.write_text("{context} {query}")
  with pytest.raises(ValueError, match=r"\{example\}"):
    PromptBuilder(template=p, few_shot=True)


def test_context_truncation():
  ctx = tuple((f"question number {i}", f"answer number {i}") for i in range(1, 6))
  t = Turn(conv_id="c", turn_id=6, qid="q", question="And then?", context=ctx)
  full = PromptBuilder().text(t)
  assert "Q1: question number 1" in full  # off by default (the paper)
  # whitespace words: each turn's two lines count 8 words; 17 fit the last two turns.
  cut = PromptBuilder(max_context_tokens=17).text(t)
  assert "Q3:" not in cut and "Q4: question number 4\nA4: answer number 4\nQ5:" in cut
  empty = PromptBuilder(max_context_tokens=0).text(t)
  assert "### Context Begin ###\n\n### Context End ###" in empty
  tok = tiny_tokenizer("chatml")
  last = "Q5: question number 5\nA5: answer number 5"
  n_last = len(tok(last, add_special_tokens=False)["input_ids"])
  cut_tok = PromptBuilder(max_context_tokens=n_last).text(t, tok)
  assert "Q5: question number 5" in cut_tok and "Q4:" not in cut_tok


# ------------------------------------------- the real chat templates (tests/fixtures, issue 34)
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "chat_templates")
QWEN_SYSTEM = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
               "assistant.<|im_end|>\n")


def real_tokenizer(name, tmp_path):
  """A tiny tokenizer with the model's tokenizer_config (chat template, special tokens), saved
  and reloaded as the stages load a local model folder (train/common.load_tokenizer_for)."""
  from transformers import AutoTokenizer
  with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
    config = json.load(f)
  tokenizer_from_config(config).save_pretrained(str(tmp_path / name))
  return AutoTokenizer.from_pretrained(str(tmp_path / name))


def qwen_chat(user):
  return QWEN_SYSTEM + "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"


def llama_chat(user, date):
  return ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
          "Cutting Knowledge Date: December 2023\nToday Date: " + date + "\n\n<|eot_id|>"
          "<|start_header_id|>user<|end_header_id|>\n\n" + user
          + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def expected_ids(tok, text):
  """Token ids built piece by piece: every special token one id, the text between them encoded
  on its own (no special tokens added)."""
  specials = sorted(tok.all_special_tokens + ["<|start_header_id|>", "<|end_header_id|>"],
                    key=len, reverse=True)
  ids = []
  for piece in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
    if piece in specials:
      ids.append(tok.convert_tokens_to_ids(piece))
    elif piece:
      ids += tok.backend_tokenizer.encode(piece, add_special_tokens=False).ids
  return ids


@pytest.mark.parametrize("few_shot", [False, True])
def test_qwen25_instruct_template(tmp_path, few_shot):
  """Qwen2.5-Instruct's template adds its default system turn when no system message is given
  (method.md 2.3): the zero-shot and few-shot prompts, token for token."""
  tok = real_tokenizer("qwen2.5-instruct.json", tmp_path)
  pb = PromptBuilder(few_shot=few_shot)
  want = qwen_chat(pb.text(TURN3))
  if not few_shot:
    assert want == qwen_chat(PROMPT3)
  assert pb.chat_text(TURN3, tok) == want
  ids = pb.token_ids(TURN3, tok)
  assert ids == expected_ids(tok, want)
  assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3 and tok.bos_token is None
  assert tok.decode(ids) == want


@pytest.mark.parametrize("few_shot", [False, True])
def test_llama32_instruct_template(tmp_path, few_shot):
  """Llama-3.2-Instruct's template opens with BOS and a system header holding the knowledge
  cut-off and today's date (vLLM's and transformers' strftime_now): the zero-shot and few-shot
  prompts, token for token, with BOS exactly once (add_special_tokens=False, method.md 2.3)."""
  tok = real_tokenizer("llama-3.2-instruct.json", tmp_path)
  pb = PromptBuilder(few_shot=few_shot)
  dates = {datetime.date.today().strftime("%d %b %Y")}
  got = pb.chat_text(TURN3, tok)
  dates.add(datetime.date.today().strftime("%d %b %Y"))  # a render across midnight
  assert got in {llama_chat(pb.text(TURN3), d) for d in dates}
  if not few_shot:
    assert got in {llama_chat(PROMPT3, d) for d in dates}
  ids = pb.token_ids(TURN3, tok)
  bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
  assert ids == expected_ids(tok, got) and ids[0] == bos and ids.count(bos) == 1
  # The tokenizer's own BOS would double it: why the prompt path passes add_special_tokens=False.
  assert tok(got)["input_ids"][:2] == [bos, bos]
  assert tok.decode(ids) == got


@pytest.mark.parametrize("name", ["qwen2.5-instruct.json", "llama-3.2-instruct.json"])
def test_sft_example_under_the_real_templates(tmp_path, name):
  """An SFT example (method.md 3.3) = the templated prompt's ids ++ the response's ++ the
  tokenizer's EOS (Qwen <|im_end|>, Llama <|eot_id|>), the loss on the last two parts only."""
  from train.sft import encode_example
  tok = real_tokenizer(name, tmp_path)
  rec = {"prompt": PROMPT3, "reasoning": " it is Varnholt Castle ", "rewrite": " Who designed "
         "Varnholt Castle? "}
  ids, loss = encode_example(rec, tok)
  prompt = PromptBuilder().token_ids(TURN3, tok)
  answer = ("<think> it is Varnholt Castle </think>\n"
            "<rewrite> Who designed Varnholt Castle? </rewrite>")
  assert ids == prompt + expected_ids(tok, answer) + [tok.eos_token_id]
  assert loss == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
  assert tok.convert_ids_to_tokens(ids[-1]) == {"qwen2.5-instruct.json": "<|im_end|>"}.get(
      name, "<|eot_id|>")
