"""Format check and extraction with the reference semantics (method.md 3.1, 4.1 points 1-2)."""

import pytest

from cqr_jax.parsing import ParsedResponse, canonical_response, parse_response, passes

# (response, format_ok, think, rewrite)
CASES = [
    ("<think>a</think>\n<rewrite>b</rewrite>", True, "a", "b"),
    ("<think> a </think>\n<rewrite> b c </rewrite>", True, " a ", " b c "),  # untrimmed
    ("<think></think>\n<rewrite></rewrite>", True, "", ""),
    ("<think>line1\nline2</think>\n<rewrite>x\ny</rewrite>", True, "line1\nline2", "x\ny"),
    (" <think>a</think>\n<rewrite>b</rewrite>", False, "a", "b"),      # leading space
    ("\n<think>a</think>\n<rewrite>b</rewrite>", False, "a", "b"),     # leading newline
    ("<think>a</think> \n<rewrite>b</rewrite>", False, "a", "b"),      # space between blocks
    ("<think>a</think>\n\n<rewrite>b</rewrite>", False, "a", "b"),     # two newlines
    ("<think>a</think><rewrite>b</rewrite>", False, "a", "b"),         # no newline
    ("<think>a</think>\n<rewrite>b</rewrite> ", False, "a", "b"),      # trailing space
    ("<think>a</think>\n<rewrite>b</rewrite>x", False, "a", "b"),      # trailing text, same line
    ("<think>a</think>\n<rewrite>b</rewrite>\n", True, "a", "b"),      # trailing newline
    ("<think>a</think>\n<rewrite>b</rewrite>\nmore text", True, "a", "b"),  # MULTILINE $
    ("<think>a</think>\n<rewrite>b</rewrite>\n<rewrite>c</rewrite>", True, "a", "b"),  # 2nd block
    ("<think>a</think>\n<rewrite>b", False, "a", None),                # truncated response
    ("<think>a", False, None, None),
    ("<rewrite>b</rewrite>", False, None, "b"),                        # no think
    ("<think>a</think>\n", False, "a", None),
    ("", False, None, None),
    ("<think>a</think>\n<rewrite>b</rewrite>\n<think>c</think>", True, "a", "b"),
    # the lazy think group can reach past an inner </think> to a later one that fits
    ("<think>a</think>x</think>\n<rewrite>b</rewrite>", True, "a", "b"),
    ("<THINK>a</THINK>\n<REWRITE>b</REWRITE>", False, None, None),     # case-sensitive
]


@pytest.mark.parametrize("text,ok,think,rewrite", CASES)
def test_parse_response(text, ok, think, rewrite):
  assert parse_response(text) == ParsedResponse(ok, think, rewrite)


def test_canonical_response_round_trip():
  s = canonical_response(" why ", " what ")
  assert s == "<think> why </think>\n<rewrite> what </rewrite>"
  assert parse_response(s) == ParsedResponse(True, " why ", " what ")


@pytest.mark.parametrize("text,ok,think,rewrite", CASES)
def test_keep_rules(text, ok, think, rewrite):
  """"tags" (the official SDPW filter and evaluation, method.md 3.1, 5.1) counts any output with
  both blocks; "format" adds phi. Both differ on every case above with blocks but no phi."""
  parsed = parse_response(text)
  assert passes(parsed, "tags") == (think is not None and rewrite is not None)
  assert passes(parsed, "format") == (ok and rewrite is not None)


def test_keep_rules_differ():
  loose = parse_response("Sure! <rewrite>b</rewrite> because <think>a</think>")  # any order
  assert passes(loose, "tags") and not passes(loose, "format")
  with pytest.raises(ValueError, match="keep/score rule 'strict'"):
    passes(loose, "strict")
