"""GPT-2 in one file (imports torch only).

Reads top to bottom: config, KV cache, the four small modules (LayerNorm, CausalSelfAttention,
MLP, Block), then GPT with its forward pass, parameter count and FLOPs estimate. Module names
(`transformer.wte`, `attn.c_attn`, `mlp.c_proj`, ...) follow nanoGPT and the GPT-2 checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    """The model's shape; everything a checkpoint needs to rebuild the module."""

    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    block_size: int = 256
    vocab_size: int = 256
    dropout: float = 0.0
    bias: bool = True
    grad_checkpointing: bool = False


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for `max_len` positions per layer.

    Preallocating avoids a `torch.cat` per generated token. Each layer writes its new keys and
    values at `length`; the model advances `length` once, after the last layer has written.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        """Forget every cached position; the buffers are reused, not reallocated."""
        self.length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys/values; return that layer's keys/values for all positions."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark `n` more positions as filled (called once per forward, after all layers)."""
        self.length += n


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own has no `bias=False` before 2.1)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def _attention_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask for queries that sit at the *end* of the key sequence, or None.

    SDPA's `is_causal` aligns the mask to the top-left corner, which is only right when there
    are as many queries as keys; with a cache, query i sits at absolute position k_len-q_len+i.
    """
    if q_len == 1 or q_len == k_len:
        return None
    ones = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    return ones.tril(diagonal=k_len - q_len)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention through PyTorch's fused `scaled_dot_product_attention`."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        assert config.d_model % config.n_head == 0, "n_head must divide d_model"
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which slot of the KV cache is ours

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
            # The cache may be stored wider than autocast's activations (fp32 vs bf16).
            k, v = k.to(q.dtype), v.to(q.dtype)
        mask = _attention_mask(T, k.size(2), x.device)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: d -> 4d -> d with GPT-2's tanh-approximated GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: LayerNorm before each sublayer keeps the residual path clean."""

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Build modules without drawing random weights that are about to be overwritten (a file's
    weights, or shapes alone on the meta device): for GPT-2 124M the draws take seconds, for
    1.5B a minute. transformers' ``no_init_weights`` does the same."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, a stack of blocks, LM head tied to wte."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                wpe=nn.Embedding(config.block_size, config.d_model),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=LayerNorm(config.d_model, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): one Parameter, so it is counted, saved and updated once.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layer):
        # each block adds two such terms, and this keeps the stream's variance from growing.
        resid_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, V] (float32) for every position, and the mean loss when targets are given.

        With `kv_cache`, `idx` holds the tokens after the cached ones: they take positions
        `kv_cache.length ..`, attend to the cache, and are appended to it. Targets of -1 are
        ignored by the loss (padding).
        """
        T = idx.size(1)
        past = 0 if kv_cache is None else kv_cache.length
        if past + T > self.config.block_size:
            raise ValueError(
                f"sequence of {T} tokens after {past} cached ones exceeds "
                f"block_size={self.config.block_size}"
            )
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        x = self._run_blocks(x, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        # float(): a bf16 softmax over a large vocabulary loses too much precision.
        logits = self.lm_head(self.transformer.ln_f(x)).float()
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
        )
        return logits, loss

    def _run_blocks(self, x: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        """Apply every block, recomputing activations in backward when checkpointing is on."""
        recompute = self.config.grad_checkpointing and self.training and kv_cache is None
        # Non-reentrant checkpointing works under autocast and with inputs that need no grad,
        # and restores the RNG state so dropout masks match between forward and recomputation.
        for block in self.transformer.h:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x, kv_cache)
        return x

    def new_kv_cache(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for `batch_size` sequences of up to block_size tokens.

        Device and dtype default to the model's parameters'; under autocast the (narrower)
        activations are stored losslessly in the wider cache.
        """
        ref = self.transformer.wte.weight
        c = self.config
        return KVCache(
            n_layer=c.n_layer,
            batch_size=batch_size,
            n_head=c.n_head,
            max_len=c.block_size,
            head_dim=c.d_model // c.n_head,
            device=ref.device if device is None else device,
            dtype=ref.dtype if dtype is None else dtype,
        )

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters; the tied wte/lm_head matrix counts once.

        `non_embedding` leaves out the position embeddings (as nanoGPT does): the token
        embedding stays in because, tied, it is also the output layer's weight.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    @staticmethod
    def param_count_formula(cfg: GPTConfig) -> int:
        """The exact parameter count, worked out from the config alone (tied head adds none)."""
        d, L = cfg.d_model, cfg.n_layer
        embeddings = cfg.vocab_size * d + cfg.block_size * d
        # Per block: ln_1 + ln_2 gains, c_attn (d x 3d), attn c_proj (d x d), c_fc (d x 4d),
        # mlp c_proj (4d x d); biases for those: 2d + 3d + d + 4d + d.
        per_block = 2 * d + 12 * d * d + (11 * d if cfg.bias else 0)
        ln_f = d + (d if cfg.bias else 0)
        return embeddings + L * per_block + ln_f

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, as in the PaLM paper's appendix B.

            6 * N + 12 * n_layer * d_model * seq_len

        N is `num_params(non_embedding=True)`: each weight costs one multiply-add (2 FLOPs)
        per token forward and twice that backward, hence 6N. Attention adds, per layer, Q @ K^T
        and A @ V: 2 * d_model * seq_len FLOPs each forward, times 3 for backward. This is
        nanoGPT's `estimate_mfu` numerator; `seq_len` defaults to block_size.
        """
        return self.flops_per_token_formula(self.config, seq_len)

    @staticmethod
    def flops_per_token_formula(cfg: GPTConfig, seq_len: int | None = None) -> float:
        """`flops_per_token` from the config alone (for plans made before building a model)."""
        T = cfg.block_size if seq_len is None else seq_len
        non_embedding = GPT.param_count_formula(cfg) - cfg.block_size * cfg.d_model
        return float(6 * non_embedding + 12 * cfg.n_layer * cfg.d_model * T)
