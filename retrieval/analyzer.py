"""Text analyzers for BM25: a whitespace tokenizer and a Lucene-style English analyzer.

The English analyzer mirrors the chain pyserini's default index uses (method.md 4.2: Lucene's
English analyzer): StandardTokenizer (Unicode UAX#29 word breaks; here the `regex` module's word
boundaries plus Lucene's token types), drop a trailing possessive 's, lowercase per code point,
remove Lucene's 33 English stop words, Porter-stem. Checked against pyserini itself, tokens, top-10
and scores (bench/bench_bm25_pyserini.py, tests/retrieval/test_bm25_pyserini.py); docs/retrieval.md
lists where they can still differ.

Analyzers are named so an index on disk records which one built it (`get_analyzer(name)`)."""

from __future__ import annotations

import re
from typing import Callable

import regex

Analyzer = Callable[[str], list[str]]

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET (also the stop set pyserini indexes with).
LUCENE_ENGLISH_STOP_WORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then "
    "there these they this to was will with".split())

_VOWELS = frozenset("aeiou")


class PorterStemmer:
  """M. F. Porter's 1980 suffix stripper, as in his reference implementation (which Lucene's
  PorterStemFilter ports): includes the reference's departures from the paper ("bli" -> "ble",
  "logi" -> "log") and leaves words of one or two letters alone.

  Works on lowercase ASCII-ish words; other characters count as consonants, as in the reference.
  """

  def __init__(self, cache_size: int = 1 << 20):
    self._cache: dict[str, str] = {}
    self._cache_size = cache_size

  def stem(self, word: str) -> str:
    hit = self._cache.get(word)
    if hit is not None:
      return hit
    out = _Stem(word).run() if len(word) > 2 else word
    if len(self._cache) < self._cache_size:
      self._cache[word] = out
    return out


class _Stem:
  """One word's stemming state: buffer `b`, end index `k` (inclusive), stem end `j`."""

  def __init__(self, word: str):
    self.b = list(word)
    self.k = len(word) - 1
    self.j = 0

  def run(self) -> str:
    self.step1ab()
    self.step1c()
    self.step2()
    self.step3()
    self.step4()
    self.step5()
    return "".join(self.b[:self.k + 1])

  # -- predicates ------------------------------------------------------------------------------
  def cons(self, i: int) -> bool:
    c = self.b[i]
    if c in _VOWELS:
      return False
    if c == "y":
      return i == 0 or not self.cons(i - 1)
    return True

  def m(self) -> int:
    """Number of VC sequences in b[0..j]: the measure of the stem."""
    n, i, j = 0, 0, self.j
    while True:  # skip the leading consonants
      if i > j:
        return n
      if not self.cons(i):
        break
      i += 1
    i += 1
    while True:
      while True:  # vowels
        if i > j:
          return n
        if self.cons(i):
          break
        i += 1
      i += 1
      n += 1
      while True:  # consonants
        if i > j:
          return n
        if not self.cons(i):
          break
        i += 1
      i += 1

  def vowel_in_stem(self) -> bool:
    return any(not self.cons(i) for i in range(self.j + 1))

  def double_c(self, i: int) -> bool:
    return i >= 1 and self.b[i] == self.b[i - 1] and self.cons(i)

  def cvc(self, i: int) -> bool:
    """b[i-2..i] is consonant-vowel-consonant and the last is not w, x or y."""
    if i < 2 or not self.cons(i) or self.cons(i - 1) or not self.cons(i - 2):
      return False
    return self.b[i] not in "wxy"

  def ends(self, s: str) -> bool:
    n = len(s)
    if n > self.k + 1 or "".join(self.b[self.k - n + 1:self.k + 1]) != s:
      return False
    self.j = self.k - n
    return True

  def set_to(self, s: str) -> None:
    """Replaces b[j+1..k] by s."""
    self.b[self.j + 1:] = list(s)
    self.k = self.j + len(s)

  def r(self, s: str) -> None:
    if self.m() > 0:
      self.set_to(s)

  # -- steps (numbered as in the reference implementation) ---------------------------------------
  def step1ab(self) -> None:
    """Plurals and -ed / -ing."""
    if self.b[self.k] == "s":
      if self.ends("sses"):
        self.k -= 2
      elif self.ends("ies"):
        self.set_to("i")
      elif self.b[self.k - 1] != "s":
        self.k -= 1
    if self.ends("eed"):
      if self.m() > 0:
        self.k -= 1
    elif (self.ends("ed") or self.ends("ing")) and self.vowel_in_stem():
      self.k = self.j
      if self.ends("at"):
        self.set_to("ate")
      elif self.ends("bl"):
        self.set_to("ble")
      elif self.ends("iz"):
        self.set_to("ize")
      elif self.double_c(self.k):
        if self.b[self.k] not in "lsz":
          self.k -= 1
      elif self.m() == 1 and self.cvc(self.k):
        self.set_to("e")
    del self.b[self.k + 1:]

  def step1c(self) -> None:
    """Terminal y -> i when the stem has a vowel."""
    if self.ends("y") and self.vowel_in_stem():
      self.b[self.k] = "i"

  _STEP2 = {
      "a": (("ational", "ate"), ("tional", "tion")),
      "c": (("enci", "ence"), ("anci", "ance")),
      "e": (("izer", "ize"),),
      "l": (("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous")),
      "o": (("ization", "ize"), ("ation", "ate"), ("ator", "ate")),
      "s": (("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous")),
      "t": (("aliti", "al"), ("iviti", "ive"), ("biliti", "ble")),
      "g": (("logi", "log"),),
  }
  _STEP3 = {
      "e": (("icate", "ic"), ("ative", ""), ("alize", "al")),
      "i": (("iciti", "ic"),),
      "l": (("ical", "ic"), ("ful", "")),
      "s": (("ness", ""),),
  }

  def _rules(self, table: dict, key: str) -> None:
    for suffix, repl in table.get(key, ()):
      if self.ends(suffix):
        self.r(repl)
        return

  def step2(self) -> None:
    """Double suffixes to single ones (-ization -> -ize, ...) when m > 0."""
    if self.k >= 1:
      self._rules(self._STEP2, self.b[self.k - 1])

  def step3(self) -> None:
    """-ic-, -full, -ness, ... when m > 0."""
    self._rules(self._STEP3, self.b[self.k])

  _STEP4 = {
      "a": ("al",), "c": ("ance", "ence"), "e": ("er",), "i": ("ic",), "l": ("able", "ible"),
      "n": ("ant", "ement", "ment", "ent"), "s": ("ism",), "t": ("ate", "iti"), "u": ("ous",),
      "v": ("ive",), "z": ("ize",),
  }

  def step4(self) -> None:
    """Drops -ant, -ence, ... when m > 1."""
    if self.k < 1:
      return
    key = self.b[self.k - 1]
    if key == "o":
      if not ((self.ends("ion") and self.j >= 0 and self.b[self.j] in "st") or self.ends("ou")):
        return
    elif not any(self.ends(s) for s in self._STEP4.get(key, ())):
      return
    if self.m() > 1:
      self.k = self.j

  def step5(self) -> None:
    """Drops a final -e when m > 1 (or m == 1 and not *o), and -ll -> -l when m > 1."""
    self.j = self.k
    if self.b[self.k] == "e":
      a = self.m()
      if a > 1 or (a == 1 and not self.cvc(self.k - 1)):
        self.k -= 1
    if self.b[self.k] == "l" and self.double_c(self.k) and self.m() > 1:
      self.k -= 1


# Lucene's StandardTokenizer: Unicode UAX#29 word segments, emitted when they hold a letter, a
# digit, an ideograph, kana, a Southeast Asian run or an emoji; pure punctuation and "_" runs are
# dropped; tokens longer than 255 characters are cut (its default maxTokenLength).
MAX_TOKEN_LENGTH = 255
# ASCII text: a word is [A-Za-z0-9_] runs joined by ' . : between letters or ' . , ; between digits
# (UAX#29 MidLetter / MidNum / MidNumLet); the same segments the Unicode path finds, faster.
_ASCII_WORD_RE = re.compile(
    r"\w+(?:(?:(?<=[A-Za-z])['.:](?=[A-Za-z])|(?<=[0-9])['.,;](?=[0-9]))\w+)*", re.ASCII)
# Other text: UAX#29 word boundaries (the `regex` module's WORD flag), then Lucene's token types.
_BOUNDARY = regex.compile(r"\b", regex.WORD | regex.V1)
# Extended_Pictographic as Unicode's emoji-data.txt defines it, which Lucene's grammar uses (the
# `regex` module's \p{Extended_Pictographic} is narrower: 2,830 code points), plus the emoji
# modifiers and the 1FB00 block that Lucene also emits alone (checked code point by code point).
_PICTOGRAPHS = (
    "\u00a9\u00ae\u203c\u2049\u2122\u2139\u2194-\u2199\u21a9\u21aa\u231a\u231b\u2328\u2388\u23cf"
    "\u23e9-\u23f3\u23f8-\u23fa\u24c2\u25aa\u25ab\u25b6\u25c0\u25fb-\u25fe\u2600-\u2605"
    "\u2607-\u2612\u2614-\u2685\u2690-\u2705\u2708-\u2712\u2714\u2716\u271d\u2721\u2728\u2733"
    "\u2734\u2744\u2747\u274c\u274e\u2753-\u2755\u2757\u2763-\u2767\u2795-\u2797\u27a1\u27b0"
    "\u27bf\u2934\u2935\u2b05-\u2b07\u2b1b\u2b1c\u2b50\u2b55\u3030\u303d\u3297\u3299"
    "\U0001f000-\U0001f0ff\U0001f10d-\U0001f10f\U0001f12f\U0001f16c-\U0001f171\U0001f17e"
    "\U0001f17f\U0001f18e\U0001f191-\U0001f19a\U0001f1ad-\U0001f1e5\U0001f201-\U0001f20f"
    "\U0001f21a\U0001f22f\U0001f232-\U0001f23a\U0001f23c-\U0001f23f\U0001f249-\U0001f3fa"
    "\U0001f3fb-\U0001f3ff\U0001f400-\U0001f53d\U0001f546-\U0001f64f\U0001f680-\U0001f6ff"
    "\U0001f774-\U0001f77f\U0001f7d5-\U0001f7ff\U0001f80c-\U0001f80f\U0001f848-\U0001f84f"
    "\U0001f85a-\U0001f85f\U0001f888-\U0001f88f\U0001f8ae-\U0001f8ff\U0001f90c-\U0001f93a"
    "\U0001f93c-\U0001f945\U0001f947-\U0001faff\U0001fb00-\U0001fbff\U0001fc00-\U0001fffd")
# Segments Lucene emits: a letter, digit, Han character (radicals included) or kana (its ALPHANUM,
# NUM, IDEOGRAPHIC, HIRAGANA, KATAKANA, HANGUL types), or a pictograph (EMOJI).
_EMITTED = regex.compile(
    r"[\p{WB=ALetter}\p{WB=Hebrew_Letter}\p{WB=Numeric}\p{WB=Katakana}\p{Script=Han}"
    r"\p{Script=Hiragana}\p{WB=Regional_Indicator}" + _PICTOGRAPHS + "]")
_REGIONAL = regex.compile(r"\p{WB=Regional_Indicator}")
_SOUTHEAST_ASIAN = regex.compile(r"(\p{LB=SA}+)")  # Thai, Lao, ...: a run is one token
_POSSESSIVE = ("'s", "\u2019s", "\uff07s")


def _unicode_segments(text: str) -> list[str]:
  out = []
  for i, part in enumerate(_SOUTHEAST_ASIAN.split(text)):
    if i % 2:
      out.append(part)
    elif part:
      for seg in _BOUNDARY.split(part):
        if not _EMITTED.search(seg):
          continue
        if seg[0].isspace():  # a space and an emoji modifier (WB4): Lucene emits the modifier
          seg = seg.lstrip()
        if len(seg) > 1 or not _REGIONAL.match(seg):  # a lone regional indicator is no flag
          out.append(seg)
  return out


def _cut(tok: str) -> list[str]:
  """Lucene's maxTokenLength: the longest token within the first 255 characters, then the rest
  scanned again (lengths counted in code points; Java counts UTF-16 units)."""
  out = []
  while len(tok) > MAX_TOKEN_LENGTH:
    head = tokenize(tok[:MAX_TOKEN_LENGTH])[0]
    out.append(head)
    tok = tok[tok.index(head) + len(head):]
  return out + tokenize(tok)


def tokenize(text: str) -> list[str]:
  """Lucene StandardTokenizer's tokens of `text` (docs/retrieval.md lists what is left out)."""
  if text.isascii():
    toks = [t for t in _ASCII_WORD_RE.findall(text) if t.strip("_")]
  else:  # no UAX#29 rule joins across white space: only non-ASCII words take the slow path
    toks, run = [], []
    for word in text.split():
      if word.isascii():
        run.append(word)
        continue
      if run:
        toks += [t for t in _ASCII_WORD_RE.findall(" ".join(run)) if t.strip("_")]
        run = []
      toks += _unicode_segments(word)
    if run:
      toks += [t for t in _ASCII_WORD_RE.findall(" ".join(run)) if t.strip("_")]
  if any(len(t) > MAX_TOKEN_LENGTH for t in toks):
    toks = [p for t in toks for p in (_cut(t) if len(t) > MAX_TOKEN_LENGTH else [t])]
  return toks


def _lower(tok: str) -> str:
  """Java's Character.toLowerCase per code point (LowerCaseFilter): no final sigma, İ -> i."""
  if tok.isascii():
    return tok.lower()
  return "".join("i" if c == "\u0130" else c.lower() for c in tok)


class LuceneEnglishAnalyzer:
  """StandardTokenizer -> EnglishPossessiveFilter -> LowerCase -> Stop -> PorterStem."""

  name = "lucene_english"

  def __init__(self, stop_words: frozenset[str] = LUCENE_ENGLISH_STOP_WORDS, stem: bool = True):
    self.stop_words = stop_words
    self.stemmer = PorterStemmer() if stem else None

  def __call__(self, text: str) -> list[str]:
    out = []
    for tok in tokenize(text):
      if tok[-2:].lower() in _POSSESSIVE:
        tok = tok[:-2]
      tok = _lower(tok)
      if not tok or tok in self.stop_words:
        continue
      out.append(self.stemmer.stem(tok) if self.stemmer else tok)
    return out


def whitespace_lower(text: str) -> list[str]:
  """Lowercase, split on whitespace: the default tokenisation for the rank-bm25-exact backend."""
  return text.lower().split()


def whitespace(text: str) -> list[str]:
  return text.split()


_ANALYZERS: dict[str, Callable[[], Analyzer]] = {
    "lucene_english": LuceneEnglishAnalyzer,
    "whitespace_lower": lambda: whitespace_lower,
    "whitespace": lambda: whitespace,
}


def get_analyzer(name: str) -> Analyzer:
  """Returns the analyzer registered under `name` (the name saved in an index's meta.json)."""
  if name not in _ANALYZERS:
    raise ValueError(f"unknown analyzer {name!r}; known: {sorted(_ANALYZERS)}")
  return _ANALYZERS[name]()
