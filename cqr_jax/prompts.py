"""The rewrite prompt (method.md 2.1-2.3) and its few-shot variant for self-distillation (2.5).

Layout (zero-shot, `templates/rewrite.txt`): the instruction paragraph ending with the two-line
format example, an empty line, `### Context Begin ###`, the context block (`Qk:`/`Ak:` lines, all
previous turns, no separators; empty for a first turn), `### Context End ###`, an empty line,
`Query: <question>`, and `Rewrite:` with nothing after it. The instruction is our own wording; a
template file with the placeholders `{context}` and `{query}` (and `{example}` for the few-shot
variant) replaces it, e.g. to reproduce the paper's exact prompt. One trailing newline of a template
file is dropped, so a file saved by an editor still ends the prompt at `Rewrite:`.

The prompt is the content of ONE user message; the model's chat template is applied with
add_generation_prompt=True, then the string is tokenized with add_special_tokens=False (2.3).
"""

from __future__ import annotations

import os
import re
from importlib import resources
from typing import Any, Protocol, Sequence

_PLACEHOLDER_RE = re.compile(r"\{(context|query|example)\}")


class TurnLike(Protocol):
  question: str
  context: Sequence[tuple[str, str | None]]


def _read_package_template(name: str) -> str:
  return resources.files("cqr_jax").joinpath("templates", name).read_text(encoding="utf-8")


def _strip_one_newline(s: str) -> str:
  return s[:-1] if s.endswith("\n") else s


def load_template(path: str | os.PathLike | None, few_shot: bool = False) -> str:
  """The template text: the packaged one (zero-shot or few-shot) or a user file, checked."""
  if path is None:
    text = _read_package_template("rewrite_fewshot.txt" if few_shot else "rewrite.txt")
    where = "package template"
  else:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    where = str(path)
  text = _strip_one_newline(text)
  needed = ("context", "query", "example") if few_shot else ("context", "query")
  found = set(_PLACEHOLDER_RE.findall(text))
  missing = [n for n in needed if n not in found]
  if missing:
    raise ValueError(f"{where}: prompt template lacks placeholder(s) "
                     + ", ".join("{" + m + "}" for m in missing))
  if not few_shot and "example" in found:
    raise ValueError(f"{where}: {{example}} placeholder in a zero-shot template "
                     "(pass few_shot=True)")
  return text


def default_few_shot_example() -> str:
  """The packaged worked example (a pronoun resolved in think, then the rewrite)."""
  return _strip_one_newline(_read_package_template("fewshot_example.txt"))


def context_lines(context: Sequence[tuple[str, str | None]], first_index: int = 1) -> list[str]:
  """`Qk: question` / `Ak: answer` lines (method.md 2.2); no answer: the Q line alone."""
  lines = []
  for k, (q, a) in enumerate(context, first_index):
    lines.append(f"Q{k}: {q}")
    if a is not None:
      lines.append(f"A{k}: {a}")
  return lines


class PromptBuilder:
  """Builds rewrite prompts for turns.

  Args:
    template: None for the packaged template, or a path to a template file.
    few_shot: use the few-shot template (method.md 2.5) with `example` in its `{example}` slot.
    max_context_tokens: None (paper: no truncation) or a budget; the most recent previous turns
      whose Q/A lines fit it are kept, numbered as in the full conversation. Counted with
      `tokenizer` (given here or to `token_ids`), else in whitespace words.
    example: few-shot example text; None for the packaged one.
    tokenizer: optional HF tokenizer used for truncation counts.
  """

  def __init__(self, template: str | os.PathLike | None = None, few_shot: bool = False,
               max_context_tokens: int | None = None, example: str | None = None,
               tokenizer: Any = None):
    if max_context_tokens is not None and max_context_tokens < 0:
      raise ValueError(f"max_context_tokens must be >= 0 or None, got {max_context_tokens}")
    self.template = load_template(template, few_shot)
    self.few_shot = few_shot
    self.max_context_tokens = max_context_tokens
    self.example = (default_few_shot_example() if example is None else example) if few_shot else ""
    self.tokenizer = tokenizer

  def _count(self, text: str, tokenizer: Any) -> int:
    if tokenizer is None:
      return len(text.split())
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])

  def context_block(self, context: Sequence[tuple[str, str | None]], tokenizer: Any = None) -> str:
    """The context block; truncated from the oldest turn when a budget is set."""
    context = list(context)
    first = 1
    if self.max_context_tokens is not None:
      tok = tokenizer if tokenizer is not None else self.tokenizer
      used, keep = 0, 0
      for pair in reversed(context):
        n = self._count("\n".join(context_lines([pair])), tok)
        if used + n > self.max_context_tokens:
          break
        used, keep = used + n, keep + 1
      first = len(context) - keep + 1
      context = context[len(context) - keep:]
    return "\n".join(context_lines(context, first))

  def text(self, turn: TurnLike, tokenizer: Any = None) -> str:
    """The prompt string (the user message content)."""
    values = {"context": self.context_block(turn.context, tokenizer), "query": turn.question,
              "example": self.example}
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], self.template)

  def messages(self, turn: TurnLike, tokenizer: Any = None) -> list[dict[str, str]]:
    """One user message, no system message (the chat template's default applies: method.md 2.3)."""
    return [{"role": "user", "content": self.text(turn, tokenizer)}]

  def chat_text(self, turn: TurnLike, tokenizer: Any) -> str:
    """The prompt after the chat template, with the generation prompt appended."""
    return tokenizer.apply_chat_template(self.messages(turn, tokenizer), tokenize=False,
                                         add_generation_prompt=True)

  def token_ids(self, turn: TurnLike, tokenizer: Any) -> list[int]:
    """Prompt token ids: chat template string, then tokenized with add_special_tokens=False."""
    return list(tokenizer(self.chat_text(turn, tokenizer), add_special_tokens=False)["input_ids"])
