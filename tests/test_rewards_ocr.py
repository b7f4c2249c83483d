"""OCR reward: the scoring rule by hand, RapidOCR for real on text rendered with PIL, TrOCR on a tiny replica."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from flowalign.rewards import RewardError, build_reward
from flowalign.rewards import tiny
from flowalign.rewards.ocr import levenshtein, ocr_reward, target_text

needs_rapidocr = pytest.mark.skipif(
    importlib.util.find_spec("rapidocr") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="rapidocr/onnxruntime not installed (extra 'ocr')")


def rendered(text: str, size=(320, 128), font_size=32) -> np.ndarray:
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow without FreeType sizing
        pytest.skip("Pillow cannot size its default font here")
    d.text((16, size[1] // 2 - font_size // 2), text, fill="black", font=font)
    return np.asarray(im)


@pytest.mark.parametrize("a, b, d", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2),
                                     ("same", "same", 0), ("ab", "ba", 2)])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


def test_target_text():
    assert target_text('a neon sign that says "Open 24/7" on a wall') == "Open 24/7"
    assert target_text('a poster reading \u201cHELLO\u201d and "later"') == "HELLO"
    assert target_text('first "A" then "B"') == "A"
    assert target_text("no quotes here", {"text": "from meta"}) == "from meta"
    with pytest.raises(RewardError, match="no double-quoted target text"):
        target_text("a sign with no quoted text")


@pytest.mark.parametrize("recognised, target, reward", [
    ("HELLO WORLD", "hello world", 1.0),              # case and spaces do not matter
    ("big SALE today HELLO WORLD!", "HELLO WORLD", 1.0),  # substring -> 1
    ("HELL0 W0RLD", "HELLO WORLD", 0.8),             # 2 edits over 10 characters
    ("", "HELLO", 0.0),
    ("completely different and much longer text", "HELLO", 0.0),  # distance clamped at len(target)
    ("HELP", "HELLO", 0.6),                          # HELP -> HELLO: 1 substitution + 1 insertion
])
def test_reward_rule_by_hand(recognised, target, reward):
    r, d = ocr_reward(recognised, target)
    assert r == pytest.approx(reward) and 0 <= d <= len(target.replace(" ", ""))


def test_empty_target_rejected():
    with pytest.raises(RewardError, match="empty target"):
        ocr_reward("abc", "   ")


@needs_rapidocr
def test_rapidocr_reads_rendered_text():
    ocr = build_reward("ocr")
    hello, blank = rendered("HELLO WORLD"), np.full((128, 320, 3), 255, np.uint8)
    out = ocr([hello, hello, blank], ['a sign that says "HELLO WORLD"', 'a sign that says "GOODBYE MOON"',
                                      'a sign that says "HELLO WORLD"'])
    assert out["reward"][0] == pytest.approx(1.0)
    assert out["reward"][1] < 0.6 and out["distance"][1] > 4
    assert out["reward"][2] == 0.0 and out["distance"][2] == 10
    assert not ocr.differentiable
    with pytest.raises(RewardError, match="no double-quoted target text"):
        ocr([hello], ["a sign"])
    assert ocr([hello], ["a sign"], [{"text": "hello world"}])["reward"][0] == pytest.approx(1.0)


def test_bad_backend():
    with pytest.raises(RewardError, match="backend must be 'rapidocr' or 'trocr'"):
        build_reward("ocr", backend="tesseract")
    with pytest.raises(RewardError, match="weight directory not found: /no/trocr"):
        build_reward("ocr", backend="trocr", path="/no/trocr")


def test_trocr_backend_on_tiny_replica(tmp_path):
    d = tiny.save_tiny_trocr(tmp_path / "trocr", seed=0)
    ocr = build_reward("ocr", backend="trocr", path=str(d), max_new_tokens=6)
    imgs = [rendered("HELLO"), rendered("WORLD")]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    texts = ocr.recognise(x)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts == ocr.recognise(x)  # greedy decoding is deterministic
    out = ocr(imgs, ['"HELLO"', '"WORLD"'])
    expect = [ocr_reward(t, g)[0] for t, g in zip(texts, ["HELLO", "WORLD"])]
    assert out["reward"].tolist() == pytest.approx(expect)
