"""The vectorised text normalisation (``normalize_texts``, used by dedup and mining) equals the per-row
definition, ``normalize_text``, on every kind of text: a text compares equal in every stage or none."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from assay.curation.content_key import normalize_text, normalize_texts

TRICKY = [
    "  Hello\u00a0  WORLD ",  # no-break space
    "\tTabs\tand\nnewlines\r\n",
    "\x0bvertical tab\x0cform feed",
    "file\x1cgroup\x1drecord\x1eunit\x1fseparators",  # str.split() separators that regex \s is not
    "ideographic\u3000space, em\u2003space, line\u2028separator, next\x85line",
    "zero\u200bwidth",  # not whitespace: kept
    "Straße",
    "STRASSE",
    "İstanbul",
    "ΣΊΣΥΦΟΣ",
    "ﬁne ligature",
    "ｆｕｌｌ　ｗｉｄｔｈ",
    "café",
    "cafe\u0301",  # NFKC composes it
    "\u212a kelvin",  # KELVIN SIGN -> k
    "Punctuation: a,b;c!? (d) [e] {f} -- 'g' \"h\"",
    "\x00nul and \x7fdel",
    "MiXeD   CaSe",
    "",
    "   ",
    "\t\n",
    None,
]


def test_normalize_texts_equals_normalize_text_on_tricky_strings():
    want = [normalize_text(t) for t in TRICKY]
    assert normalize_texts(pa.array(TRICKY, pa.string())).to_pylist() == want
    chunked = pa.chunked_array([TRICKY[:7], TRICKY[7:]], pa.string())
    assert normalize_texts(chunked).to_pylist() == want
    assert want[0] == "hello world" and want[6] == want[7] == "strasse" and want[-4:] == [None] * 4


@pytest.mark.parametrize("texts", [[], [None, None], ["", " "]])
def test_normalize_texts_of_nothing_is_no_text(texts):
    assert normalize_texts(pa.array(texts, pa.string())).to_pylist() == [None] * len(texts)


PIECES = st.sampled_from([*"aZ09 -.,!", "  ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x00",
                          "\x7f", "\x85", "\u00a0", "\u2003", "\u3000", "Ｈ", "ﬁ", "É", "ß", "İ", "Σ",
                          "\u0301", "\u212a"])  # fmt: skip
TEXTS = st.one_of(st.none(), st.lists(PIECES, max_size=10).map("".join), st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.lists(TEXTS, max_size=30))
def test_normalize_texts_equals_normalize_text(texts):
    assert normalize_texts(pa.array(texts, pa.string())).to_pylist() == [normalize_text(t) for t in texts]
