"""Sampling from a GPT: temperature, top-k, nucleus (top-p), streamed token by token."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F

from minigpt import pretrained
from minigpt.config import ConfigError, GenerateConfig
from minigpt.model import GPT, KVCache
from minigpt.tokenizer import Tokenizer


def greedy_next(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row of `logits` [B, V], as a LongTensor [B]."""
    return logits.argmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of `logits` [B, V] from :func:`next_token_probs`; a LongTensor [B].

    A temperature of 0 means greedy (the limit of the distribution as temperature falls to 0).
    `logits` is not modified. Pass a `generator` to make draws reproducible without touching
    global RNG.
    """
    if temperature == 0:
        return greedy_next(logits)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def next_token_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """The distribution [B, V] that sampling draws from, each row renormalised to sum to 1.

    Filters apply in order: temperature, top-k, then top-p on what top-k left (nucleus sampling
    over the top-k tokens' renormalised probabilities, as Hugging Face's warpers chain them).
    """
    if not 0 < temperature < float("inf"):  # also False for nan
        raise ValueError(f"temperature={temperature} must be finite and > 0 (0 means greedy)")
    logits = _divide_by_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = _keep_top_k(logits, top_k)
    if top_p is not None:
        logits = _keep_top_p(logits, top_p)
    return F.softmax(logits, dim=-1)


def _divide_by_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, safe however small the temperature.

    Softmax ignores a shift, so shifting each row by its max changes no probability; but then
    the top logit is 0 and the others are negative, so a tiny temperature sends them to -inf
    instead of overflowing to inf - inf = nan: sampling becomes the arg-max, its limit. The top
    is set to 0 again because 0 / t is nan when t is too small for float32 (below ~1e-45).
    """
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return (shifted / temperature).masked_fill(shifted == 0, 0.0)


def _keep_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with it are kept)."""
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None to disable)")
    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p`.

    A token is dropped when the tokens ranked above it already hold `top_p` of the mass, so
    the token that crosses `top_p` is kept and so is the most likely one, however small `top_p`
    is. The running sum is float64 where the device has it: in float32, summed over a 50k
    vocabulary, it rounds up to 1.0 before the last tokens, so even top_p=1 dropped some.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None to disable)")
    if top_p == 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    exact = torch.float32 if logits.device.type == "mps" else torch.float64  # MPS has no float64
    probs = F.softmax(sorted_logits.to(exact), dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_above >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def generate(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` new tokens, one LongTensor [B] per step, so callers can stream.

    `prompt` [B, T0] is cropped to its last block_size tokens. The model sits in eval mode
    while the iterator runs (its previous mode is restored when it finishes or is closed);
    each step runs under `torch.inference_mode`, switched off again around each `yield` so
    it never leaks into the caller's code.

    The context window follows one rule, with or without the cache, so the cache is a speed-up
    that never changes the output (greedy decoding gives identical tokens both ways): it grows
    to block_size tokens; when one more token would not fit, it keeps its newest half
    (:func:`window_after`) and grows again. Learned absolute positions mean no cached key
    survives a cut, so the cache is re-filled once per half window, not once per token as a
    window that slides by one would need (at 1,000 tokens past a 128-token context that is
    what makes the cache pay). The price: right after a cut the model sees half a window of
    context, where a sliding window would show it a whole one.
    """
    if prompt.dim() != 2 or prompt.size(1) == 0:
        raise ValueError(
            f"prompt must be [batch, tokens] with tokens >= 1, got {tuple(prompt.shape)}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if max_new_tokens == 0:
        return

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if greedy:
            return greedy_next(logits)
        return sample_next(logits, temperature, top_k, top_p, generator)

    was_training = model.training
    model.eval()
    try:
        context, cache, logits = _prefill(model, prompt, use_cache)
        for step in range(max_new_tokens):
            context, token = _advance(context, logits, pick, model.config.block_size)
            yield token.clone()  # a normal tensor: inference tensors can't enter autograd later
            if step + 1 < max_new_tokens:
                logits = _next_logits(model, context, cache)
    finally:
        model.train(was_training)


def _prefill(
    model: GPT, prompt: torch.Tensor, use_cache: bool
) -> tuple[torch.Tensor, KVCache | None, torch.Tensor]:
    """Crop the prompt to the model's window and compute the last position's logits."""
    context = prompt[:, -model.config.block_size :]
    cache = model.new_kv_cache(prompt.size(0), device=prompt.device) if use_cache else None
    with torch.inference_mode():
        logits, _ = model(context, kv_cache=cache)
    return context, cache, logits[:, -1]


def _advance(
    context: torch.Tensor,
    logits: torch.Tensor,
    pick: Callable[[torch.Tensor], torch.Tensor],
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the next token and append it to the context window (see :func:`window_after`)."""
    with torch.inference_mode():
        token = pick(logits)
        context = torch.cat([context, token[:, None]], dim=1)
    return context[:, -window_after(context.size(1), block_size) :], token


def window_after(length: int, block_size: int) -> int:
    """How many of the newest ``length`` tokens the model conditions on: all of them while they
    fit in block_size; once they do not, the newest half of the window."""
    return length if length <= block_size else max(1, block_size // 2)


def _next_logits(model: GPT, context: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits for the token after `context`, whose last token is not yet in the cache."""
    with torch.inference_mode():
        if cache is None:
            logits, _ = model(context)
        elif cache.length == context.size(1) - 1:  # the window grew by the one new token
            logits, _ = model(context[:, -1:], kv_cache=cache)
        else:  # the window was cut to its newest half: every position moved (see `generate`)
            cache.reset()
            logits, _ = model(context, kv_cache=cache)
    return logits[:, -1]


# pragma: no mutate start - generate.py's input and output (make mutation)
def print_samples(cfg: GenerateConfig, out: TextIO | None = None) -> list[str]:
    """``generate.py``: load the checkpoint, then print each sample, prompt first, as it is made."""
    out = out or sys.stdout
    device = _resolve_device(cfg.device)
    # Before the prompt is read: a folder given as the checkpoint is the likelier mistake.
    pretrained.source_kind(cfg.checkpoint, key="checkpoint")
    prompt = _read_prompt(cfg)
    model, tokenizer, _ = pretrained.load_model(cfg.checkpoint, device)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("prompt is empty after tokenization; give a prompt of at least one token")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    texts = []
    for i in range(cfg.num_samples):
        if cfg.num_samples > 1:
            out.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\n")
        out.write(prompt)
        out.flush()
        tokens = generate(
            model,
            torch.tensor([ids], device=device),
            cfg.max_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            generator=generator,
            use_cache=cfg.kv_cache,
        )
        texts.append(prompt + _stream(tokenizer, (int(t[0]) for t in tokens), out))
    out.write("\n")
    out.flush()
    return texts


# A token that ends in an incomplete UTF-8 character is held back until the character is whole;
# a model that emits bytes which never form one gets them written (as U+FFFD) after this many.
MAX_HELD_TOKENS = 16


# pragma: no mutate end
def _stream(tokenizer: Tokenizer, ids: Iterable[int], out: TextIO) -> str:
    """Write text as tokens arrive, holding back a byte sequence that is not yet whole UTF-8.

    Only the held-back tokens are decoded again at each step, so a long generation costs time
    linear in its length (decoding everything seen so far at every step was quadratic).
    """
    pieces: list[str] = []
    held: list[int] = []
    for token in ids:
        held.append(token)
        text = tokenizer.decode(held)
        if text.endswith("\ufffd") and len(held) < MAX_HELD_TOKENS:
            continue
        out.write(text)
        out.flush()
        pieces.append(text)
        held = []
    if held:
        pieces.append(tokenizer.decode(held))
        out.write(pieces[-1])
    return "".join(pieces)


# pragma: no mutate start - reading the prompt (make mutation)
def _read_prompt(cfg: GenerateConfig) -> str:
    """The prompt as typed, or the text of ``prompt_file``, refused in one line when unusable."""
    if cfg.prompt_file is None:
        try:  # argv's undecodable bytes arrive as surrogates (PEP 383): get those bytes back
            raw = cfg.prompt.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = cfg.prompt.encode("utf-8", "surrogatepass")
        return _decode_utf8("prompt", raw)
    return _decode_utf8(f"prompt_file={cfg.prompt_file}", _read_prompt_file(cfg.prompt_file))


# The model sees only the last block_size tokens of a prompt; a bigger file is surely a mistake.
MAX_PROMPT_FILE_BYTES = 16 * 2**20


def _read_prompt_file(name: str) -> bytes:
    """The bytes of a regular file of at most MAX_PROMPT_FILE_BYTES; never waits on a FIFO."""
    path = Path(name).expanduser()
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"prompt_file={name} is a folder, not a text file")
        if not stat.S_ISREG(mode):
            raise ConfigError(
                f"prompt_file={name} is not a regular file (a device, FIFO or socket); "
                "give a text file"
            )
        # O_NONBLOCK: should the file become a FIFO after the check, opening it must not wait.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            data = f.read(MAX_PROMPT_FILE_BYTES + 1)  # st_size is 0 for /proc files: read <= max
    except FileNotFoundError:
        raise ConfigError(f"prompt_file={name} does not exist") from None
    except OSError as err:
        raise ConfigError(f"prompt_file={name} cannot be read ({err.strerror})") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise ConfigError(
            f"prompt_file={name} is larger than {MAX_PROMPT_FILE_BYTES // 2**20} MiB; "
            "the model sees only the last block_size tokens, so give the end of it"
        )
    return data


# pragma: no mutate end
def _decode_utf8(what: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{what} is not UTF-8 text: invalid byte 0x{data[err.start]:02x} at offset {err.start}"
        ) from None


# pragma: no mutate block - device choice (make mutation)
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or auto")
    return torch.device(name)
