"""The Lucene-style tokenizer on text where a regex tokenizer and Lucene's StandardTokenizer part
ways. Expected tokens are what pyserini 1.6.0 (Anserini 1.7.1, Lucene's EnglishAnalyzer chain)
returned for these strings; tests/retrieval/test_bm25_pyserini.py re-checks them where Java is.
"""

import random

from retrieval import analyzer
from retrieval.analyzer import LuceneEnglishAnalyzer


def test_pictographs_and_flags_are_tokens():
  text = ("IBM Watson\u00ae Assistant \u00a9 2020 \u2122 \u2605 \u2606 \u2665 \U0001f600"
          "\U0001f44d\U0001f3fd \U0001f1eb\U0001f1f7 \U0001f1eb")
  assert LuceneEnglishAnalyzer()(text) == [
      "ibm", "watson", "\u00ae", "assist", "\u00a9", "2020", "\u2122", "\u2605", "\u2665",
      "\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f1eb\U0001f1f7"]


def test_underscores_possessives_and_joiners():
  text = "snake_case __ _ _private a_b __init__ John's Jones\u2019 dogs' U.S.A. e.g. 3.14 1,000.5"
  assert LuceneEnglishAnalyzer()(text) == [
      "snake_cas", "_privat", "a_b", "__init__", "john", "jone", "dog", "u.s.a", "e.g", "3.14",
      "1,000.5"]


def test_other_scripts_marks_and_case():
  text = ("\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22abc \u0130stanbul \u03a3\u039f\u03a6\u039f"
          "\u03a3 caf\u00e9 cafe\u0301 tip\u200e km\u00b2 \u00bd \u65e5\u672c\u8a9e "
          "\u3072\u3089\u304c\u306a")
  assert LuceneEnglishAnalyzer()(text) == [
      "\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22", "abc", "istanbul",
      "\u03c3\u03bf\u03c6\u03bf\u03c3", "caf\u00e9", "cafe\u0301", "tip\u200e", "km",
      "\u65e5", "\u672c", "\u8a9e", "\u3072", "\u3089", "\u304c", "\u306a"]


def test_long_tokens_are_cut_at_255():
  toks = analyzer.tokenize("x" * 300 + " " + "ab." * 120)
  assert [len(t) for t in toks] == [255, 45, 254, 104]


def test_ascii_fast_path_equals_unicode_path():
  rng = random.Random(0)
  chars = "abcXYZ019_.,;:'- !?()\u2019\u00e9\u0301\u00a0\u200d\U0001f600\U0001f3fb"
  for _ in range(5000):
    s = "".join(rng.choice(chars) for _ in range(rng.randint(1, 30)))
    assert analyzer.tokenize(s) == analyzer._unicode_segments(s), repr(s)
