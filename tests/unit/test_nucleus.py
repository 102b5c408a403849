"""Nucleus (top-p) sampling, checked against a brute-force reference written from its definition:
sort by probability, keep tokens until the kept mass reaches p (the one that crosses it
included, the most likely always), renormalise; after temperature, and after top-k when both."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt import sample
from minigpt.model import GPT, GPTConfig
from minigpt.sample import generate, next_token_probs, sample_next


def reference_probs(
    logits: list[float], temperature: float, top_k: int | None, top_p: float | None
) -> list[float]:
    """The sampling distribution of one row, in plain Python floats (double precision)."""
    scaled = [v / temperature for v in logits]
    top = max(scaled)
    weights = [math.exp(v - top) for v in scaled]
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    kept = set(order[:top_k] if top_k is not None else order)
    if top_p is not None:
        total = sum(weights[i] for i in kept)
        mass, nucleus = 0.0, set()
        for i in (i for i in order if i in kept):
            if nucleus and mass >= top_p:
                break
            nucleus.add(i)
            mass += weights[i] / total
        kept = nucleus
    total = sum(weights[i] for i in kept)
    return [weights[i] / total if i in kept else 0.0 for i in range(len(weights))]


def random_rows(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2.5


@pytest.mark.parametrize("temperature", [0.5, 0.8, 1.0, 2.0])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("top_k", [None, 10])
def test_the_kept_set_and_its_probabilities_match_the_reference(
    temperature: float, top_p: float, top_k: int | None
) -> None:
    logits = random_rows(200, 64, seed=int(temperature * 100 + top_p * 10))
    probs = next_token_probs(logits, temperature, top_k, top_p).double()
    for row, got in zip(logits.tolist(), probs, strict=True):
        expected = torch.tensor(reference_probs(row, temperature, top_k, top_p), dtype=torch.double)
        assert torch.equal(got > 0, expected > 0), "kept another set of tokens"
        assert torch.allclose(got, expected, atol=1e-6)
        assert abs(float(got.sum()) - 1.0) < 1e-6  # renormalised


def test_the_token_that_crosses_p_is_kept() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = next_token_probs(probs.log(), top_p=0.6) > 0  # 0.5 < 0.6: the 0.3 one crosses it
    assert kept.tolist() == [[True, True, False, False]]
    kept = next_token_probs(probs.log(), top_p=0.5) > 0  # 0.5 reaches 0.5 by itself
    assert kept.tolist() == [[True, False, False, False]]


def test_mass_exactly_at_p_already_holds_p() -> None:
    """Two equal tokens hold exactly 0.5 each: with top_p=0.5 the first one reaches p by itself,
    so the second is dropped (the rule is mass above >= p, not > p)."""
    kept = next_token_probs(torch.zeros(1, 2), top_p=0.5) > 0
    assert int(kept.sum()) == 1


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5, float("nan")])
def test_a_top_p_outside_zero_to_one_is_refused_naming_it(top_p: float) -> None:
    with pytest.raises(ValueError, match=r"top_p=.* must be in \(0, 1\]"):
        next_token_probs(torch.zeros(1, 4), top_p=top_p)


def test_the_most_likely_token_is_kept_however_small_p() -> None:
    logits = random_rows(100, 64, seed=3)
    kept = next_token_probs(logits, top_p=1e-12) > 0
    assert torch.equal(kept.sum(dim=-1), torch.ones(100, dtype=torch.long))
    assert torch.equal(kept.float().argmax(dim=-1), logits.argmax(dim=-1))


def test_top_p_applies_after_temperature() -> None:
    """At temperature 1 the top two tokens are needed to reach 0.7; sharpened, one suffices."""
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    assert (next_token_probs(logits, 1.0, None, 0.7) > 0).tolist() == [[False, True, False, True]]
    assert (next_token_probs(logits, 0.3, None, 0.7) > 0).tolist() == [[False, True, False, False]]
    flat = next_token_probs(logits, 5.0, None, 0.7) > 0  # flattened: three are needed
    assert flat.tolist() == [[False, True, True, True]]


def test_top_p_takes_its_share_of_what_top_k_left() -> None:
    """Top-k first, then the nucleus of the renormalised top-k: 0.4 of the whole would be one
    token, but of the top two's mass (0.6) it takes both."""
    logits = torch.tensor([[0.35, 0.25, 0.2, 0.2]]).log()
    assert (next_token_probs(logits, 1.0, None, 0.4) > 0).tolist() == [[True, True, False, False]]
    kept = next_token_probs(logits, 1.0, 2, 0.6) > 0  # 0.35 / 0.6 = 0.58 < 0.6: both
    assert kept.tolist() == [[True, True, False, False]]
    kept = next_token_probs(logits, 1.0, 2, 0.55) > 0  # 0.58 >= 0.55: one
    assert kept.tolist() == [[True, False, False, False]]


def test_top_p_one_keeps_every_token_of_a_large_vocabulary() -> None:
    """A float32 running sum over 50k tokens rounds up to 1.0 before the tail: it dropped some."""
    logits = random_rows(8, 50_304, seed=5)
    assert bool((next_token_probs(logits, 1.0, None, 1.0) > 0).all())
    nearly = next_token_probs(logits, 1.0, None, 1.0 - 1e-9) > 0
    assert int(nearly.sum(dim=-1).min()) > 50_000


def test_top_p_one_is_no_filter_even_for_tokens_too_unlikely_to_add_up() -> None:
    """The tail here is below float64's resolution next to the top token (1 + 1e-26 == 1): a
    running sum would say the top token already holds all the mass. top_p=1 filters nothing."""
    logits = torch.tensor([[0.0, -60.0, -60.0, -60.0]])
    assert bool((next_token_probs(logits, 1.0, None, 1.0) > 0).all())


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.8, None, 0.9), (1.3, 6, 0.8)])
def test_sampling_frequencies_follow_the_renormalised_nucleus(
    temperature: float, top_k: int | None, top_p: float
) -> None:
    weights = [0.22, 0.18, 0.14, 0.11, 0.09, 0.07, 0.05, 0.04, 0.03, 0.02, 0.02, 0.01, 0.01, 0.01]
    row = torch.tensor(weights + [0.0, 0.0]).log()  # and two impossible tokens
    expected = torch.tensor(reference_probs(row.tolist(), temperature, top_k, top_p))
    draws = 200_000
    g = torch.Generator().manual_seed(0)
    picked = sample_next(row.expand(draws, -1), temperature, top_k, top_p, generator=g)
    freq = torch.bincount(picked, minlength=16).double() / draws
    assert bool((freq[expected == 0] == 0).all()), "drew a token outside the nucleus"
    sigma = (expected * (1 - expected) / draws).sqrt()
    assert bool(((freq - expected).abs() <= 5 * sigma + 1e-9).all()), (freq, expected)
    assert 1 < int((expected > 0).sum()) < 14  # the filter did cut, and left a choice


def tiny_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=32, block_size=16, vocab_size=50))
    with torch.no_grad():  # spread the logits: at init every token is nearly equally likely
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model


def test_generation_draws_from_the_same_nucleus_with_and_without_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every step's logits reach the sampler with the same settings, and the same tokens come
    out, past block_size too (where the cache is re-filled)."""
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    real = sample.sample_next

    def run(use_cache: bool) -> torch.Tensor:
        def spy(logits: torch.Tensor, *args: object) -> torch.Tensor:
            seen[use_cache].append(next_token_probs(logits, 0.8, None, 0.9) > 0)
            return real(logits, *args)

        monkeypatch.setattr(sample, "sample_next", spy)
        prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
        g = torch.Generator().manual_seed(7)
        steps = generate(
            tiny_model(), prompt, 40, temperature=0.8, top_p=0.9, generator=g, use_cache=use_cache
        )
        return torch.stack(list(steps), dim=1)

    cached, uncached = run(True), run(False)
    assert torch.equal(cached, uncached)
    assert all(torch.equal(a, b) for a, b in zip(seen[True], seen[False], strict=True))
    assert len(seen[True]) == 40 and any(bool((k.sum(-1) > 1).any()) for k in seen[True])
