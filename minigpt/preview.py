"""The samples shown while training: prompted with the start of the val text, so that a corpus of
English gets an English prompt and one of code a code prompt, and drawn with their own seeded
generator, so that showing them never changes the training run."""

from __future__ import annotations

import numpy as np
import torch

from minigpt.model import GPT
from minigpt.sample import generate
from minigpt.tokenizer import Tokenizer

PROMPT_TOKENS = 16
SAMPLE_TOKENS = 120


def val_prompt(val: np.ndarray, tokenizer: Tokenizer, block_size: int) -> list[int]:
    """The val text's first tokens from its first line start (at most half a context), the same
    at every sample. The split may open mid-document, mid-word: a line start reads as the
    corpus does. Without a line break in reach, the split's first tokens."""
    n = max(1, min(PROMPT_TOKENS, block_size // 2, len(val)))
    head = [int(t) for t in val[: 8 * n]]
    text = tokenizer.decode(head)
    line = text[text.find("\n") + 1 :].lstrip("\n") if "\n" in text else ""
    ids = tokenizer.encode(line)[:n] if line.strip() else []
    return ids if len(ids) == n else head[:n]


def sample_text(
    model: GPT, tokenizer: Tokenizer, prompt: list[int], seed: int, device: torch.device
) -> str:
    """The prompt and ``SAMPLE_TOKENS`` tokens after it, as text; the global RNG is untouched."""
    ids = torch.tensor([prompt], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = torch.get_rng_state()  # sampling must not disturb the training RNG stream
    try:
        new = [
            int(t[0])
            for t in generate(model, ids, SAMPLE_TOKENS, temperature=0.8, top_k=40, generator=gen)
        ]
    finally:
        torch.set_rng_state(rng)
    return tokenizer.decode(prompt + new)
