"""Sampling: the filters, reproducibility, and streamed generation with and without the KV cache."""

from __future__ import annotations

import io
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from minigpt.config import ConfigError
from minigpt.model import GPT, GPTConfig
from minigpt.sample import (
    MAX_HELD_TOKENS,
    _decode_utf8,
    _stream,
    generate,
    greedy_next,
    next_token_probs,
    sample_next,
    window_after,
)
from minigpt.tokenizer import ByteTokenizer

VOCAB = 50


def tiny_model(seed: int = 0, **overrides) -> GPT:
    values = dict(n_layer=2, n_head=2, d_model=32, block_size=16, vocab_size=VOCAB)
    values.update(overrides)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**values))


def context_sensitive_model(seed: int = 0) -> GPT:
    """A model whose greedy output depends on its whole context.

    At GPT-2's init std the tied embedding makes the model repeat its last token forever, which
    would let a wrong context window go unnoticed.
    """
    model = tiny_model(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model


def random_logits(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def prompt_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def collect(model: GPT, prompt: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    return torch.stack(list(generate(model, prompt, n, **kwargs)), dim=1)


def test_greedy_next_is_the_argmax():
    logits = random_logits()
    assert torch.equal(greedy_next(logits), logits.argmax(dim=-1))


def test_top_k_one_equals_greedy():
    logits = random_logits(batch=64)
    picked = sample_next(logits, temperature=1.5, top_k=1, top_p=None)
    assert torch.equal(picked, greedy_next(logits))


def test_tiny_top_p_keeps_only_the_argmax():
    logits = random_logits(batch=64)
    picked = sample_next(logits, temperature=1.0, top_k=None, top_p=1e-6)
    assert torch.equal(picked, greedy_next(logits))


def test_top_k_never_samples_outside_the_top_k():
    logits = random_logits(batch=1).expand(4000, VOCAB)
    picked = sample_next(logits, temperature=5.0, top_k=2, top_p=None)
    top2 = set(torch.topk(logits[0], 2).indices.tolist())
    assert set(picked.tolist()) == top2


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(4000, 4)
    picked = sample_next(logits, temperature=1.0, top_k=None, top_p=0.7)
    assert set(picked.tolist()) == {1, 3}


def test_temperature_sharpens_and_flattens_the_distribution():
    logits = random_logits(batch=1).expand(4000, VOCAB)
    g = torch.Generator().manual_seed(0)
    cold = sample_next(logits, temperature=0.01, top_k=None, top_p=None, generator=g)
    hot = sample_next(logits, temperature=100.0, top_k=None, top_p=None, generator=g)
    assert torch.equal(cold, greedy_next(logits))
    assert len(set(hot.tolist())) > 0.9 * VOCAB  # nearly uniform: almost every token appears


def test_temperature_zero_means_greedy():
    logits = random_logits()
    assert torch.equal(sample_next(logits, temperature=0.0), greedy_next(logits))


def test_same_generator_seed_gives_the_same_samples():
    logits = random_logits(batch=32)

    def draw(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return sample_next(logits, temperature=1.0, top_k=10, top_p=0.9, generator=g)

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


def test_sample_next_leaves_the_logits_untouched():
    logits = random_logits()
    before = logits.clone()
    sample_next(logits, temperature=0.5, top_k=3, top_p=0.5)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-300, 5e-324])
@pytest.mark.parametrize("filters", [{}, {"top_k": 5}, {"top_p": 0.9}, {"top_k": 5, "top_p": 0.9}])
def test_a_vanishing_temperature_samples_the_argmax(temperature, filters):
    logits = random_logits(batch=64) * 100  # large gaps: dividing them overflows float32
    picked = sample_next(logits, temperature, generator=torch.Generator().manual_seed(0), **filters)
    assert torch.equal(picked, greedy_next(logits))


@pytest.mark.parametrize("temperature", [0.1, 0.8, 1.0, 3.0])
def test_ordinary_temperatures_sample_as_softmax_of_logits_over_temperature(temperature):
    logits = random_logits(batch=256, seed=3) + 40.0  # an offset that the shift must not matter

    def draw(probs: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(11)
        return torch.multinomial(probs, num_samples=1, generator=g).squeeze(-1)

    expected = draw(F.softmax(logits / temperature, dim=-1))
    g = torch.Generator().manual_seed(11)
    assert torch.equal(sample_next(logits, temperature, generator=g), expected)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"top_k": 0}, r"top_k=0 must be >= 1 \(or None to disable\)"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
        ({"top_p": math.nan}, r"top_p=nan must be in \(0, 1\]"),
        ({"temperature": -1}, r"temperature=-1 must be finite and > 0 \(0 means greedy\)"),
        ({"temperature": math.inf}, r"temperature=inf must be finite and > 0"),
        ({"temperature": math.nan}, r"temperature=nan must be finite and > 0"),
    ],
)
def test_sample_next_rejects_invalid_settings_naming_them(bad, message):
    settings = {"temperature": 1.0, "top_k": None, "top_p": None} | bad
    with pytest.raises(ValueError, match=message):
        sample_next(random_logits(), **settings)


def test_a_distribution_at_temperature_zero_is_refused_sample_next_goes_greedy_instead():
    """0 means greedy in sample_next, which never reaches the division; next_token_probs itself
    has no distribution to give at 0 and says so rather than dividing by zero."""
    with pytest.raises(ValueError, match=r"temperature=0.0 must be finite and > 0"):
        next_token_probs(random_logits(), 0.0)


def test_sampling_raises_no_warning():
    """A softmax over an implicit dimension warns (deprecated); every filter names its dim."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_next(random_logits(), 0.7, top_k=5, top_p=0.9)
        next_token_probs(random_logits(), 1.0)


def test_the_default_temperature_is_one():
    logits = random_logits(batch=64)

    def draw(**kwargs) -> torch.Tensor:
        return sample_next(logits, generator=torch.Generator().manual_seed(5), **kwargs)

    assert torch.equal(draw(), draw(temperature=1.0))
    assert not torch.equal(draw(), draw(temperature=2.0))
    model = context_sensitive_model()  # peaked logits: the temperature changes what is drawn

    def run(**kwargs) -> torch.Tensor:
        g = torch.Generator().manual_seed(5)
        return collect(model, prompt_tokens(8, 4), 6, generator=g, **kwargs)

    assert torch.equal(run(), run(temperature=1.0))
    assert not torch.equal(run(), run(temperature=2.0))


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 1e-9}])
def test_generate_passes_its_filters_to_the_sampler(filters):
    """top_k=1 and a tiny top_p leave one token: sampling becomes greedy decoding."""
    model = context_sensitive_model()
    g = torch.Generator().manual_seed(0)
    sampled = collect(model, prompt_tokens(4, 3), 8, temperature=3.0, generator=g, **filters)
    assert torch.equal(sampled, collect(model, prompt_tokens(4, 3), 8, greedy=True))


@pytest.mark.parametrize("use_cache", [None, True, False])
def test_the_cache_is_used_by_default_and_never_allocated_without_it(use_cache, monkeypatch):
    model = tiny_model()
    made = []
    real = model.new_kv_cache
    monkeypatch.setattr(model, "new_kv_cache", lambda *a, **k: made.append(1) or real(*a, **k))
    kwargs = {} if use_cache is None else {"use_cache": use_cache}
    assert collect(model, prompt_tokens(2, 4), 3, greedy=True, **kwargs).shape == (2, 3)
    assert made == ([] if use_cache is False else [1])


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (torch.zeros(4, dtype=torch.long), r"prompt must be \[batch, tokens\] .* got \(4,\)"),
        (torch.zeros(2, 0, dtype=torch.long), r"with tokens >= 1, got \(2, 0\)"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"got \(1, 2, 3\)"),
    ],
)
def test_a_prompt_that_is_not_batch_by_tokens_is_refused_with_its_shape(prompt, message):
    with pytest.raises(ValueError, match=message):
        next(generate(tiny_model(), prompt, 3))


def test_a_negative_token_count_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"max_new_tokens=-1 must be >= 0"):
        next(generate(tiny_model(), prompt_tokens(1, 4), -1))


def test_generate_streams_one_token_batch_per_step():
    model = tiny_model()
    stream = generate(model, prompt_tokens(3, 4), 5, greedy=True)
    first = next(stream)
    assert first.shape == (3,) and first.dtype == torch.long
    assert not torch.is_inference_mode_enabled()  # inference mode does not leak to the caller
    assert len(list(stream)) == 4


@pytest.mark.parametrize("prompt_len", [1, 5, 16])
def test_greedy_generation_is_identical_with_and_without_cache(prompt_len):
    model = context_sensitive_model()
    prompt = prompt_tokens(2, prompt_len)
    cached = collect(model, prompt, 40, greedy=True, use_cache=True)  # well past block_size
    uncached = collect(model, prompt, 40, greedy=True, use_cache=False)
    assert len(set(uncached[0, 16:].tolist())) > 5  # not stuck repeating one token
    assert torch.equal(cached, uncached)


def test_the_window_grows_to_block_size_then_keeps_its_newest_half():
    assert [window_after(n, 16) for n in (1, 15, 16, 17)] == [1, 15, 16, 8]
    assert window_after(2, 1) == 1  # a window of one token keeps that token


@pytest.mark.parametrize("use_cache", [False, True])
def test_generation_conditions_on_the_window_the_rule_gives(use_cache):
    model = context_sensitive_model().eval()
    prompt = prompt_tokens(1, 10)
    tokens = collect(model, prompt, 30, greedy=True, use_cache=use_cache)
    context = prompt
    with torch.no_grad():
        for i in range(tokens.size(1)):
            expected = model(context)[0][:, -1].argmax(dim=-1)
            assert torch.equal(tokens[:, i], expected), f"step {i}"
            context = torch.cat([context, tokens[:, i : i + 1]], dim=1)
            context = context[:, -window_after(context.size(1), 16) :]


def test_the_cache_is_refilled_once_per_half_window_not_per_token():
    model = context_sensitive_model().eval()
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].size(1)))
    collect(model, prompt_tokens(1, 10), 30, greedy=True, use_cache=True)
    # Prefill 10; the window fills at 16 and is cut to 8 three times in 30 tokens (after 7,
    # 16 and 25 of them): each cut re-fills 8 positions once, every other step feeds one token.
    assert [n for n in lengths if n > 1] == [10, 8, 8, 8]
    assert len(lengths) == 30


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_longer_than_block_size_is_cropped(use_cache):
    model = context_sensitive_model()
    long_prompt = prompt_tokens(2, 40)
    tokens = collect(model, long_prompt, 6, greedy=True, use_cache=use_cache)
    cropped = collect(model, long_prompt[:, -16:], 6, greedy=True, use_cache=use_cache)
    other_start = collect(model, long_prompt[:, -17:-1], 6, greedy=True, use_cache=use_cache)
    assert torch.equal(tokens, cropped)
    assert not torch.equal(tokens, other_start)  # the crop keeps the *last* tokens


def test_sampled_generation_is_reproducible_with_a_seeded_generator():
    model = tiny_model()
    prompt = prompt_tokens(2, 3)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return collect(model, prompt, 24, temperature=0.8, top_k=20, top_p=0.95, generator=g)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_generate_runs_in_eval_mode_and_restores_training_mode():
    model = tiny_model(dropout=0.5).train()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    tokens = collect(model, prompt_tokens(1, 4), 3, greedy=True)
    assert modes and not any(modes)
    assert model.training
    assert tokens.shape == (1, 3)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_generate_yields_exactly_the_tokens_asked_for(n):
    assert len(list(generate(tiny_model(), prompt_tokens(1, 4), n))) == n


def test_a_billion_new_tokens_stream_without_allocating_for_them():
    stream = generate(tiny_model(), prompt_tokens(1, 4), 10**9, greedy=True)
    assert len(list(itertools.islice(stream, 3))) == 3  # would take gigabytes if preallocated
    stream.close()


class CountingByteTokenizer(ByteTokenizer):
    """Bytes as tokens, remembering the longest list of ids it was asked to decode."""

    longest = 0

    def decode(self, ids):
        self.longest = max(self.longest, len(ids))
        return super().decode(ids)


class Chunks(io.StringIO):
    """An output that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []

    def write(self, s: str) -> int:
        self.chunks.append(s)
        return super().write(s)


def test_streamed_text_is_whole_characters_and_equals_the_full_decode():
    text = "plain é 漢字 🙂 end" * 50
    tokenizer, out = CountingByteTokenizer(), Chunks()
    assert _stream(tokenizer, list(text.encode("utf-8")), out) == text
    assert out.getvalue() == text
    assert not any("\ufffd" in chunk for chunk in out.chunks)  # no character was cut in two
    assert tokenizer.longest <= 4  # only the bytes of one unfinished character are re-decoded


def test_bytes_that_never_form_a_character_are_written_not_held_for_ever():
    tokenizer, out = CountingByteTokenizer(), io.StringIO()
    text = _stream(tokenizer, [0xFF] * 1000 + [ord("x")], out)
    assert text == "\ufffd" * 1000 + "x"
    assert tokenizer.longest <= MAX_HELD_TOKENS


def test_a_stream_cut_inside_a_character_still_writes_and_returns_its_last_bytes():
    """A generation that stops half way through a multi-byte character: the held bytes are
    written (as U+FFFD) and returned, so the printed and returned text equal the full decode."""
    tokenizer, out = CountingByteTokenizer(), Chunks()
    ids = list("ab é".encode())[:-1]  # the last byte of é is never generated
    text = _stream(tokenizer, ids, out)
    assert text == out.getvalue() == ByteTokenizer().decode(ids) == "ab \ufffd"
    assert out.chunks[-1] == "\ufffd"


def test_prompt_bytes_decode_as_utf8_or_name_the_first_bad_byte():
    assert _decode_utf8("prompt_file=p.txt", "é 漢".encode()) == "é 漢"
    with pytest.raises(ConfigError) as err:
        _decode_utf8("prompt_file=p.txt", b"ok \xff")
    assert str(err.value).startswith(
        "prompt_file=p.txt is not UTF-8 text: invalid byte 0xff at offset 3"
    )
