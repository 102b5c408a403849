"""Attention and generation on the GPU: SDPA's fused kernels, the KV cache, and a checkpoint
written on the GPU sampled on the CPU."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from minigpt import pretrained, runtime
from minigpt.model import GPT, GPTConfig
from minigpt.sample import generate
from tests.conftest import ROOT
from tests.gpu.suite import (
    DEVICE,
    ON_GPU,
    SUITE_MARKS,
    Background,
    Run,
    cuda_only,
    gpu_or_dry,
)

pytestmark = SUITE_MARKS

SHAPES = {  # head size 32 (model=tiny) and 64 (model=mini, GPT-2's own)
    "tiny": GPTConfig(n_layer=2, n_head=2, d_model=64, block_size=64, vocab_size=256),
    "mini": GPTConfig(n_layer=4, n_head=4, d_model=256, block_size=128, vocab_size=256),
}
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
MATH_OP = "aten::_scaled_dot_product_attention_math"


def attention_ops(work: Callable[[], object]) -> set[str]:
    """The SDPA implementations ``work`` ran (aten op names, recorded on the host)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        work()
    return {e.name for e in prof.events() if "scaled_dot_product" in e.name}


def training_step(model: GPT) -> Callable[[], object]:
    """Forward and backward of one batch as the trainer runs them: in bf16 autocast on the GPU
    (float32 in the dry run: CPUs without bf16 units take minutes over it)."""
    tokens = torch.randint(0, 256, (4, model.config.block_size + 1), device=DEVICE)
    dtype = gpu_or_dry(torch.bfloat16, torch.float32)

    def step() -> None:
        with runtime.autocast(DEVICE, dtype):
            _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()

    return step


def generation(model: GPT) -> Callable[[], object]:
    """Generation as generate.py runs it, with and without the cache, past the context's end:
    the prompt's prefill, one token at a time, the window's cut and the cache's refill."""
    prompt = torch.randint(0, 256, (2, 5), device=DEVICE)
    extra = model.config.block_size + 10

    def run() -> None:
        for use_cache in (True, False):
            list(generate(model, prompt, extra, greedy=True, use_cache=use_cache))

    return run


@pytest.mark.parametrize("shape", SHAPES, ids=[f"model={name}" for name in SHAPES])
def test_sdpa_runs_flash_or_memory_efficient_kernels_for_training_and_generation(
    shape: str,
) -> None:
    """Restricted to the flash and memory-efficient kernels, SDPA raises "No available kernel"
    at any call neither serves, so these runs passing is the proof; the profile shows that SDPA
    picks them by itself too, never the math kernel. (In the dry run: CPU's flash kernel.)"""
    torch.manual_seed(0)
    model = GPT(SHAPES[shape]).to(DEVICE)
    for work in (training_step(model), generation(model)):
        with sdpa_kernel(FUSED):
            work()
        chosen = attention_ops(work)
        fused = [op for op in chosen if "flash_attention" in op or "efficient_attention" in op]
        assert fused and MATH_OP not in chosen, chosen


@cuda_only("a restriction that only the math kernel could serve")
def test_sdpa_restricted_to_fused_kernels_refuses_what_only_the_math_kernel_serves() -> None:
    """The control for the test above: a float64 model, which neither fused kernel takes, runs
    unrestricted (on the math kernel) and fails under the same restriction."""
    model = GPT(SHAPES["tiny"]).to(DEVICE, torch.float64)
    tokens = torch.randint(0, 256, (2, 16), device=DEVICE)
    assert MATH_OP in attention_ops(lambda: model(tokens))
    with sdpa_kernel(FUSED), pytest.raises(RuntimeError, match="kernel"):
        model(tokens)


@pytest.fixture(scope="module")
def trained(bf16_run: Run) -> tuple[GPT, object]:
    """The bf16 run's best model, on the device, with its tokenizer."""
    model, tokenizer, _ = pretrained.load_model(
        str(bf16_run.run_dir / "checkpoints" / "best.pt"), DEVICE
    )
    return model, tokenizer


def test_kv_cache_generation_equals_uncached_generation(trained: tuple[GPT, object]) -> None:
    """Greedy and seeded sampling give the same tokens with and without the cache, past the
    context's end (where the window is cut and the cache refilled); the cached logits match a
    full forward pass to float32 rounding."""
    model, tokenizer = trained
    prompt = torch.tensor([tokenizer.encode("abcdef"), tokenizer.encode("uvwxyz")], device=DEVICE)
    length = model.config.block_size + 20

    def tokens(use_cache: bool, **how: object) -> list[list[int]]:
        return [t.tolist() for t in generate(model, prompt, length, use_cache=use_cache, **how)]

    def sampled(use_cache: bool) -> list[list[int]]:  # the same draws, the same generator state
        gen = torch.Generator(device=DEVICE).manual_seed(7)
        return tokens(use_cache, temperature=1.0, top_k=40, generator=gen)

    assert tokens(True, greedy=True) == tokens(False, greedy=True)
    assert sampled(True) == sampled(False)

    block = model.config.block_size
    sequence = torch.randint(0, 256, (2, block), device=DEVICE)
    with torch.inference_mode():
        full, _ = model(sequence)
        cache = model.new_kv_cache(2)
        pieces = [model(sequence[:, :8], kv_cache=cache)[0]]  # prefill
        pieces.append(model(sequence[:, 8:12], kv_cache=cache)[0])  # a chunk: the masked path
        pieces += [model(sequence[:, t : t + 1], kv_cache=cache)[0] for t in range(12, block)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_checkpoint_written_on_gpu_samples_the_same_text_on_cpu(
    bf16_run: Run, trained: tuple[GPT, object], background: Background
) -> None:
    """generate.py device=cpu reads the GPU's checkpoint and writes what the GPU writes."""
    ckpt = bf16_run.run_dir / "checkpoints" / "best.pt"
    if ON_GPU:  # saved from the GPU: without a map_location its tensors load back onto it
        raw = torch.load(ckpt, weights_only=True)
        assert raw["model"]["transformer.wte.weight"].is_cuda
    argv = [sys.executable, str(ROOT / "generate.py"), f"checkpoint={ckpt}", "device=cpu"]
    argv += ["prompt=abcdef", "max_tokens=60", "top_k=1"]
    done = background.run(argv, bf16_run.run_dir, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    model, tokenizer = trained
    prompt = torch.tensor([tokenizer.encode("abcdef")], device=DEVICE)
    ids = [int(t[0]) for t in generate(model, prompt, 60, greedy=True)]
    assert done.stdout == "abcdef" + tokenizer.decode(ids) + "\n"
    if ON_GPU:  # the dry run's few steps do not learn the alphabet
        assert "ghijklmnopqrstuvwxyz\nabcdefghijklmnopqrstuvwxyz" in done.stdout
