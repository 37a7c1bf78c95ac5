"""`data inspect`: counts, token lengths after the chat template, truncation, padding vs packing waste, a
suggested max_seq_length, and the self-contained HTML report with its inline SVG plot."""

import random
import xml.etree.ElementTree as ET

import pytest
from conftest import make_tokenizer
from messy import INVALID, VALID, write_messy

from loraforge.data.formats import read_examples
from loraforge.data.report import render_html, write_html
from loraforge.data.stats import histogram, inspect_file, suggest_max_seq_length, waste
from loraforge.data.templates import tokenize_example
from loraforge.errors import LoraforgeError


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_messy_file(tmp_path, tok):
    f = write_messy(tmp_path / "messy.jsonl")
    s = inspect_file(f, tok, max_seq_length=24, batch_size=4)
    assert (s.input.valid, s.input.invalid) == (VALID, INVALID)
    assert s.turns == {2: VALID} and s.roles == {"user": VALID, "assistant": VALID}
    assert s.labels == {} and s.model_family == "ChatML/Qwen"
    assert len(s.lengths) == VALID and s.truncated == sum(n > 24 for n in s.lengths) > 0
    assert sum(c for _, _, c in s.histogram) == VALID
    assert s.suggested_max_seq_length == 64 and s.suggested_truncated == 0


def test_lengths_match_the_trainer_tokenization(chat_file, tok):
    s = inspect_file(chat_file, tok, max_seq_length=64)
    assert s.lengths == [len(tokenize_example(tok, ex).input_ids) for ex in read_examples(chat_file)]


def test_histogram_percentiles_and_suggestion():
    assert histogram([5, 6, 7, 20], bins=2) == [(5, 13, 3), (13, 21, 1)]
    lengths = sorted([100] * 99 + [5000])
    assert suggest_max_seq_length(lengths) == 128


def test_packing_of_short_examples_wastes_less_than_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 300) for _ in range(300)]
    pad, packed, rows = waste(lengths, 1024, batch_size=8)
    assert packed < pad and rows == 44 == -(-sum(lengths) // 1024)  # as few rows as the tokens allow
    assert waste([1025], 1024, 8) == (0.0, 0.0, 0)


def test_html_report_is_self_contained(tmp_path, chat_file, tok):
    s = inspect_file(chat_file, tok, max_seq_length=16)
    html = render_html(s)
    assert "<script" not in html and "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    svg = html[html.index("<svg"):html.index("</svg>") + 6]
    root = ET.fromstring(svg)
    assert len(root.findall("{http://www.w3.org/2000/svg}rect")) == len(s.histogram)
    assert "max_seq_length 16" in svg
    out = write_html(s, tmp_path / "r.html")
    assert out.read_text().startswith("<!doctype html>")
    with pytest.raises(LoraforgeError, match="overwrite the input"):
        write_html(s, chat_file)
