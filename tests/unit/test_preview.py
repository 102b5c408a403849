"""The training samples' prompt comes from the val text, not from a fixed string."""

from __future__ import annotations

import numpy as np

from minigpt.preview import PROMPT_TOKENS, val_prompt
from minigpt.tokenizer import ByteTokenizer


def _val(text: str) -> np.ndarray:
    return np.array(ByteTokenizer().encode(text), dtype=np.uint16)


def test_the_prompt_starts_at_the_first_line_start_of_the_val_text() -> None:
    tok = ByteTokenizer()
    val = _val("ick brown fox\nThe quick brown fox jumps over the lazy dog\n" * 5)
    prompt = val_prompt(val, tok, block_size=64)
    assert tok.decode(prompt) == "The quick brown "
    assert len(prompt) == PROMPT_TOKENS
    assert val_prompt(val, tok, block_size=64) == prompt  # the same at every sample


def test_without_a_line_break_the_prompt_is_the_first_val_tokens() -> None:
    tok = ByteTokenizer()
    prompt = val_prompt(_val("Il était une fois un petit chat qui dormait " * 4), tok, 64)
    assert tok.decode(prompt).startswith("Il était une")


def test_the_prompt_is_at_most_half_a_context() -> None:
    tok = ByteTokenizer()
    assert len(val_prompt(_val("x\nabcdefghijklmnopqrstuvwxyz\n" * 3), tok, block_size=8)) == 4
