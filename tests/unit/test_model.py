"""The GPT model: masking, init, parameter/FLOP accounting, KV cache, checkpointing, training."""

from __future__ import annotations

import math

import pytest
import torch

import minigpt.model as model_module
from minigpt.model import GPT, GPTConfig


def tiny_config(**overrides) -> GPTConfig:
    values = dict(n_layer=2, n_head=2, d_model=32, block_size=16, vocab_size=50)
    values.update(overrides)
    return GPTConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def random_tokens(batch: int, length: int, vocab: int = 50, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@pytest.mark.parametrize(("dropout", "length", "t"), [(0.0, 12, 5), (0.2, 12, 5), (0.0, 2, 0)])
def test_causal_mask_hides_future_tokens(dropout, length, t):
    # With dropout the model stays in training mode, where attention takes its dropout path;
    # reseeding before each forward draws the same dropout masks for both inputs.
    model = tiny_model(dropout=dropout).train(dropout > 0)
    idx = random_tokens(2, length)
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 50
    with torch.no_grad():
        torch.manual_seed(123)
        before, _ = model(idx)
        torch.manual_seed(123)
        after, _ = model(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=0)
    for pos in range(t + 1, length):
        assert not torch.allclose(after[:, pos], before[:, pos]), f"position {pos} ignored t+1"


@pytest.mark.parametrize("training", [True, False])
def test_attention_drops_out_in_training_only(training, monkeypatch):
    seen = []
    sdpa = model_module.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    model = tiny_model(dropout=0.25).train(training)
    model(random_tokens(1, 4))
    assert seen == [0.25 if training else 0.0] * 2  # one call per layer


def test_a_cache_wider_than_the_activations_is_read_at_their_precision():
    """A bfloat16 model with a float32 cache (as under autocast): the cached keys and values are
    cast down for attention, and the result is the uncached one."""
    model = tiny_model().eval().to(torch.bfloat16)
    idx = random_tokens(1, 6)
    cache = model.new_kv_cache(1, dtype=torch.float32)
    with torch.no_grad():
        model(idx[:, :5], kv_cache=cache)
        cached, _ = model(idx[:, 5:], kv_cache=cache)
        full, _ = model(idx)
    torch.testing.assert_close(cached[:, -1], full[:, -1], rtol=0, atol=0.05)


def test_logits_cover_every_position_in_float32():
    model = tiny_model()
    logits, loss = model(random_tokens(3, 7))
    assert logits.shape == (3, 7, 50)
    assert logits.dtype == torch.float32
    assert loss is None


def test_loss_is_mean_cross_entropy_ignoring_minus_one_targets():
    model = tiny_model().eval()
    idx, targets = random_tokens(2, 8), random_tokens(2, 8, seed=2)
    masked = targets.clone()
    masked[:, 4:] = -1
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :4].reshape(-1, 50), targets[:, :4].reshape(-1)
    )
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bias": False},
        {"n_layer": 3, "n_head": 4, "d_model": 48, "block_size": 7, "vocab_size": 101},
        {"n_layer": 1, "n_head": 1, "d_model": 8, "block_size": 4, "vocab_size": 3, "bias": False},
    ],
)
def test_num_params_matches_the_analytic_formula(overrides):
    cfg = tiny_config(**overrides)
    assert GPT(cfg).num_params() == GPT.param_count_formula(cfg)


def test_non_embedding_count_leaves_out_only_position_embeddings():
    cfg = tiny_config()
    model = GPT(cfg)
    assert model.num_params() - model.num_params(non_embedding=True) == cfg.block_size * cfg.d_model


def test_lm_head_is_the_token_embedding_parameter():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert sum(1 for _ in model.parameters()) == len(model.state_dict()) - 1  # tied key twice


def test_tied_weights_stay_equal_after_an_optimizer_step():
    model = tiny_model()
    before = model.transformer.wte.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, loss = model(random_tokens(2, 8), random_tokens(2, 8, seed=2))
    loss.backward()
    opt.step()
    assert not torch.equal(model.transformer.wte.weight, before)
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def test_residual_projections_use_gpt2_scaled_init():
    n_layer = 4
    model = tiny_model(n_layer=n_layer, n_head=4, d_model=128)
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        if name.endswith(
            ("c_proj.weight", "c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")
        ):
            # centred: within 5 standard errors of 0
            assert abs(p.mean().item()) < 5 * p.std().item() / math.sqrt(p.numel()), name


def test_a_head_count_that_does_not_divide_the_width_is_refused():
    with pytest.raises(AssertionError, match="^n_head must divide d_model$"):
        GPT(tiny_config(n_head=3))


def test_flops_per_token_follows_the_palm_formula():
    cfg = tiny_config()
    model = GPT(cfg)
    n = model.num_params(non_embedding=True)
    attention = 12 * cfg.n_layer * cfg.d_model
    assert model.flops_per_token() == 6 * n + attention * cfg.block_size
    assert model.flops_per_token(seq_len=4) == 6 * n + attention * 4


def test_forward_rejects_sequences_longer_than_block_size():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(random_tokens(1, 17))
    cache = model.new_kv_cache(1)
    model(random_tokens(1, 10), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(random_tokens(1, 7), kv_cache=cache)


def test_cached_incremental_decoding_matches_full_forward():
    model = tiny_model().eval()
    idx = random_tokens(2, 16)
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        full, _ = model(idx)
        chunks = [model(idx[:, :5], kv_cache=cache)[0]]  # prefill
        chunks += [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(5, 9)]
        chunks.append(model(idx[:, 9:11], kv_cache=cache)[0])  # two queries after a cache
        chunks.append(model(idx[:, 11:16], kv_cache=cache)[0])  # several
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_reset_starts_a_fresh_sequence():
    model = tiny_model().eval()
    cache = model.new_kv_cache(1)
    a, b = random_tokens(1, 6), random_tokens(1, 6, seed=3)
    with torch.no_grad():
        model(a, kv_cache=cache)
        cache.reset()
        assert cache.length == 0
        logits, _ = model(b, kv_cache=cache)
        torch.testing.assert_close(logits, model(b)[0], rtol=0, atol=1e-5)


def test_kv_cache_is_preallocated_per_layer():
    cfg = tiny_config()
    cache = GPT(cfg).new_kv_cache(3, dtype=torch.bfloat16)
    head_dim = cfg.d_model // cfg.n_head
    assert len(cache.k) == len(cache.v) == cfg.n_layer
    assert cache.k[0].shape == cache.v[-1].shape == (3, cfg.n_head, cfg.block_size, head_dim)
    assert {t.dtype for t in cache.k + cache.v} == {torch.bfloat16}


def test_kv_cache_defaults_to_the_models_device_and_dtype_and_takes_others():
    """The meta device stands in for an accelerator: CPU-only tests can still see a tensor
    land on the wrong device."""
    model = GPT(tiny_config()).to(dtype=torch.bfloat16)
    cache = model.new_kv_cache(1)
    assert {(t.device.type, t.dtype) for t in cache.k + cache.v} == {("cpu", torch.bfloat16)}
    cache = model.new_kv_cache(1, device="meta", dtype=torch.float16)
    assert {(t.device.type, t.dtype) for t in cache.k + cache.v} == {("meta", torch.float16)}
    with torch.device("meta"):
        on_meta = GPT(tiny_config())
    cache = on_meta.new_kv_cache(1)
    assert {(t.device.type, t.dtype) for t in cache.k + cache.v} == {("meta", torch.float32)}


def test_the_attention_mask_is_made_on_the_queries_device():
    mask = model_module._attention_mask(2, 5, torch.device("meta"))
    assert mask is not None and mask.device.type == "meta" and mask.shape == (2, 5)


def test_a_cache_overflow_names_both_lengths():
    """The model refuses a too-long sequence first; the cache guards its own buffers too."""
    cache = model_module.KVCache(n_layer=1, batch_size=1, n_head=2, max_len=16, head_dim=4)
    cache.update(0, torch.zeros(1, 2, 10, 4), torch.zeros(1, 2, 10, 4))
    cache.advance(10)
    kv = torch.zeros(1, 2, 7, 4)
    with pytest.raises(ValueError, match=r"^KV cache overflow: 17 positions > max_len 16$"):
        cache.update(0, kv, kv)


def _loss_and_grads(model: GPT, idx: torch.Tensor, targets: torch.Tensor):
    torch.manual_seed(123)  # same dropout masks in both runs
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(dropout, monkeypatch):
    calls = []
    real_checkpoint = model_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", counting_checkpoint)
    plain = tiny_model(dropout=dropout).train()
    ckpt = tiny_model(dropout=dropout, grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    idx, targets = random_tokens(2, 16), random_tokens(2, 16, seed=2)
    loss_a, grads_a = _loss_and_grads(plain, idx, targets)
    loss_b, grads_b = _loss_and_grads(ckpt, idx, targets)
    assert calls == [False, False]  # one per block, non-reentrant
    torch.testing.assert_close(loss_b, loss_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


def test_bf16_autocast_forward_and_backward_on_cpu():
    model = tiny_model()
    idx, targets = random_tokens(2, 16), random_tokens(2, 16, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert logits.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


def test_bf16_autocast_works_with_the_kv_cache():
    model = tiny_model().eval()
    idx = random_tokens(1, 8)
    cache = model.new_kv_cache(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx[:, :4], kv_cache=cache)
        logits, _ = model(idx[:, 4:], kv_cache=cache)
        full, _ = model(idx)
    torch.testing.assert_close(logits, full[:, 4:], rtol=0.05, atol=0.05)


def test_tiny_model_overfits_a_fixed_batch():
    model = tiny_model()
    idx, targets = random_tokens(4, 16), random_tokens(4, 16, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(50), rel=0.1)  # GPT-2 init predicts ~uniformly
    assert losses[-1] < 0.5 * losses[0]


def test_skip_init_draws_nothing_and_puts_the_initialisers_back() -> None:
    from minigpt.model import skip_init

    config = GPTConfig(n_layer=1, n_head=2, d_model=8, block_size=4, vocab_size=16)
    normal = torch.nn.init.normal_
    with torch.device("meta"), skip_init():
        shapes = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    assert torch.nn.init.normal_ is normal
    before = torch.random.get_rng_state()
    with skip_init():
        GPT(config)
    assert torch.equal(torch.random.get_rng_state(), before)  # not one random number drawn
    assert shapes == {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
