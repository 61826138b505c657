"""Parsing a rewriter response: the format check and the rewrite extraction (method.md 3.1, 4.1).

Semantics follow the reference reward function exactly:
- `format_ok` (phi in paper Eq. 2): the response matches, from position 0, the pattern
  `<think>ANY</think>` NEWLINE `<rewrite>ANY</rewrite>` END with DOTALL | MULTILINE and lazy ANY.
  Because of MULTILINE, END also matches just before a newline, so text after a newline following
  `</rewrite>` still passes; leading whitespace, a space or two newlines between the blocks, or a
  trailing space after `</rewrite>` fail.
- `rewrite`: the first `<rewrite>(.*?)</rewrite>` group (DOTALL), untrimmed; it is extracted even
  when the format check fails (the caller decides what to do with it). `think` likewise.

Which outputs SDPW keeps and evaluation scores is `passes(parsed, rule)`: "tags" (the official
code, method.md 3.1 and 5.1: a think block and a rewrite block anywhere) or "format" (phi and a
rewrite). The GRPO reward always uses phi (4.1).
"""

from __future__ import annotations

import dataclasses
import re

_FORMAT_RE = re.compile(r"^<think>.*?</think>\n<rewrite>.*?</rewrite>$", re.DOTALL | re.MULTILINE)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_REWRITE_RE = re.compile(r"<rewrite>(.*?)</rewrite>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ParsedResponse:
  """format_ok: phi(y) of method.md 4.1; think/rewrite: first groups untrimmed, or None."""

  format_ok: bool
  think: str | None
  rewrite: str | None


def format_ok(text: str) -> bool:
  """The format check phi(y) (method.md 4.1 point 1)."""
  return _FORMAT_RE.match(text) is not None


def extract_rewrite(text: str) -> str | None:
  """First `<rewrite>...</rewrite>` content, untrimmed (method.md 4.1 point 2), or None."""
  m = _REWRITE_RE.search(text)
  return m.group(1) if m else None


def extract_think(text: str) -> str | None:
  m = _THINK_RE.search(text)
  return m.group(1) if m else None


def parse_response(text: str) -> ParsedResponse:
  """Parses a decoded response (special tokens already removed)."""
  return ParsedResponse(format_ok(text), extract_think(text), extract_rewrite(text))


RULES = ("tags", "format")


def passes(parsed: ParsedResponse, rule: str) -> bool:
  """Whether an output counts (SDPW keeps it, evaluation scores its rewrite): "tags": it has a
  `<think>..</think>` and a `<rewrite>..</rewrite>` block anywhere (method.md 3.1, 5.1);
  "format": it passes phi (4.1) and has a rewrite."""
  if rule == "tags":
    return parsed.think is not None and parsed.rewrite is not None
  if rule == "format":
    return parsed.format_ok and parsed.rewrite is not None
  raise ValueError(f"keep/score rule {rule!r}: expected one of {RULES}")


QUERY_FORMS = ("rewrite", "question+rewrite")


def retrieval_query(question: str, rewrite: str, form: str) -> str:
  """The text retrieved for a parsed `rewrite` of `question` (retrieval.query): the rewrite
  alone (the paper, method.md 4.1 point 2), or the question followed by the rewrite."""
  if form == "rewrite":
    return rewrite
  if form == "question+rewrite":
    return f"{question} {rewrite}"
  raise ValueError(f"retrieval.query={form!r}: expected one of {QUERY_FORMS}")


def canonical_response(think: str, rewrite: str) -> str:
  """The SFT target of method.md 3.3: tags around the untrimmed texts, one newline between."""
  return f"<think>{think}</think>\n<rewrite>{rewrite}</rewrite>"
