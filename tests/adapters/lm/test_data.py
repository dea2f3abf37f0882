"""Causal-LM text data: default text, token stream, evaluation windows, disjoint calibration windows."""
import pytest
import torch

from compresskit.adapters.lm.data import EVAL_HEAD_TOKENS, calib_windows, eval_windows, load_text, token_stream
from compresskit.errors import CompressKitError


class ByteTokenizer:
    """Stand-in tokenizer: one token per UTF-8 byte."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": list(text.encode("utf-8"))}


def test_default_text_is_deterministic_and_long():
    text = load_text()
    assert text == load_text(None) == load_text("pydoc")
    assert len(text) > 300_000  # room for the evaluation head and calibration after it


def test_text_file_source(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world\n", encoding="utf-8")
    assert load_text(str(path)) == "hello world\n"
    assert token_stream(ByteTokenizer(), str(path)).tolist() == list(b"hello world\n")
    with pytest.raises(CompressKitError, match="not a file"):
        load_text(str(tmp_path / "missing.txt"))


def test_eval_windows_are_the_head_of_the_stream():
    tokens = torch.arange(10_000)
    windows = eval_windows(tokens, n_tokens=2048, window=512)
    assert windows.shape == (4, 512) and windows.dtype == torch.long
    assert torch.equal(windows.flatten(), tokens[:2048])
    with pytest.raises(CompressKitError, match="multiple of window"):
        eval_windows(tokens, n_tokens=1000, window=512)
    with pytest.raises(CompressKitError, match="fewer than n_tokens"):
        eval_windows(tokens[:1000], n_tokens=1024, window=512)
    with pytest.raises(CompressKitError, match=f"n_tokens <= {EVAL_HEAD_TOKENS}"):
        eval_windows(torch.arange(2 * EVAL_HEAD_TOKENS), n_tokens=EVAL_HEAD_TOKENS + 512, window=512)


def test_calibration_never_touches_the_evaluation_region():
    tokens = torch.arange(EVAL_HEAD_TOKENS + 5000)  # a token's value is its position
    windows = calib_windows(tokens, n_samples=64, seq_len=256, seed=0)
    assert windows.shape == (64, 256)
    assert windows.min() >= EVAL_HEAD_TOKENS  # the largest evaluation slice ends before this
    assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.ones(64, 255, dtype=torch.long))  # contiguous


def test_calibration_respects_an_excluded_middle_range():
    tokens = torch.arange(1000)
    windows = calib_windows(tokens, n_samples=200, seq_len=50, seed=3, exclude=(400, 600))
    starts, ends = windows[:, 0], windows[:, -1]
    assert bool(((ends < 400) | (starts >= 600)).all())
    assert bool((starts < 400).any()) and bool((starts >= 600).any())


def test_calibration_is_seeded():
    tokens = torch.arange(EVAL_HEAD_TOKENS + 5000)
    a = calib_windows(tokens, 8, 128, seed=7)
    assert torch.equal(a, calib_windows(tokens, 8, 128, seed=7))
    assert not torch.equal(a, calib_windows(tokens, 8, 128, seed=8))


def test_calibration_on_a_short_text_explains():
    with pytest.raises(CompressKitError, match="too few"):
        calib_windows(torch.arange(EVAL_HEAD_TOKENS + 10), n_samples=4, seq_len=128)


def test_default_text_disjoint_end_to_end():
    tokens = token_stream(ByteTokenizer())  # [n_bytes]
    positions = torch.arange(tokens.numel())
    evaluated = set(eval_windows(positions, 8192, 512).flatten().tolist())
    calibrated = set(calib_windows(positions, 128, 2048, seed=0).flatten().tolist())
    assert evaluated and calibrated and evaluated.isdisjoint(calibrated)
