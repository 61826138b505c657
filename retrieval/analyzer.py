"""Text analyzers for BM25: a whitespace tokenizer and a Lucene-style English analyzer.

The English analyzer mirrors the chain pyserini's default index uses (method.md 4.2: Lucene's
English analyzer): tokenize on word boundaries, drop a trailing possessive 's, lowercase, remove
Lucene's 33 English stop words, Porter-stem. The tokenizer is a regex approximation of Lucene's
StandardTokenizer (Unicode UAX#29 word breaks); docs/retrieval.md lists where they can differ.

Analyzers are named so an index on disk records which one built it (`get_analyzer(name)`).
"""

from __future__ import annotations

import re
from typing import Callable

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


# A word: word characters, joined by ' . : between letters or ' . , ; between digits (UAX#29
# MidLetter / MidNum / MidNumLet). Underscore joins like UAX#29's ExtendNumLet.
_WORD_RE = re.compile(
    r"\w+(?:(?:(?<=[^\W\d_])['\u2019.:](?=[^\W\d_])|(?<=\d)['\u2019.,;](?=\d))\w+)*")
_POSSESSIVE = ("'s", "\u2019s", "\uff07s")


class LuceneEnglishAnalyzer:
  """StandardTokenizer (approx.) -> EnglishPossessiveFilter -> LowerCase -> Stop -> PorterStem."""

  name = "lucene_english"

  def __init__(self, stop_words: frozenset[str] = LUCENE_ENGLISH_STOP_WORDS, stem: bool = True):
    self.stop_words = stop_words
    self.stemmer = PorterStemmer() if stem else None

  def __call__(self, text: str) -> list[str]:
    out = []
    for tok in _WORD_RE.findall(text):
      if tok[-2:].lower() in _POSSESSIVE:
        tok = tok[:-2]
      tok = tok.lower()
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
