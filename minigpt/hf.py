"""Hugging Face's GPT-2 layout: its ``config.json`` <-> our model config, its tensors <-> ours.

``minigpt/model.py`` computes exactly ``transformers``' ``GPT2LMHeadModel`` (tanh GELU, LayerNorm
eps 1e-5, head tied to ``wte``) under the same parameter names, but not in the same layout: HF's
``Conv1D`` stores the four projection matrices as [in, out] where ``nn.Linear`` has [out, in].
The square ``attn.c_proj.weight`` passes any shape check either way, so the transposition is
decided by name, always, never by shape. Files may lack the ``transformer.`` prefix (a saved
``GPT2Model``) and ``lm_head.weight`` (tied), and may carry the causal-mask buffers older
``transformers`` saved (``attn.bias``, ``attn.masked_bias``).

This module only maps values; reading and checking files is :mod:`minigpt.weights`' job.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from minigpt.checkpoint import CheckpointError

# HF's Conv1D weights, stored [in, out]: transposed on the way in and on the way out.
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# The causal mask, not a parameter (the leading dot: "attn.c_attn.bias" is a parameter).
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
PREFIX = "transformer."
HEAD = "lm_head.weight"
EMBEDDING = "transformer.wte.weight"
# Both are GELU's tanh approximation (one in Python, one fused): the same function to ~1e-7.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5
# config.json's key for the minigpt tokenizer kind an export carries, so that a model exported
# and read back gets the tokenizer it was trained with (not a wrapper of the same ids).
TOKENIZER_KEY = "minigpt_tokenizer"


def model_config_from_hf(config: Any, where: str) -> dict[str, Any]:
    """Our ``model_config`` for a HF ``config.json``, or one line naming what we cannot express."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: config.json holds no JSON object")
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(
            f"{where}: model_type={model_type!r} is not GPT-2; minigpt reads GPT-2-architecture "
            "models only (model_type gpt2)"
        )
    quantized = config.get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise CheckpointError(
            f"{where}: the weights are quantized (quantization_config: {method}); minigpt reads "
            "full-precision GPT-2 weights: give the model it was quantized from"
        )
    differences = _differences(config)
    if differences:
        key, value = differences[0]
        raise CheckpointError(
            f"{where}: {key}={value!r} is not GPT-2's; minigpt's GPT computes only GPT-2 "
            f"({_gpt2_value(key)})"
        )
    sizes = {}
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{where}: config.json {key}={value!r} must be an integer >= 1")
        sizes[key] = value
    dropout = config.get("resid_pdrop", 0.0)
    return {
        "n_layer": sizes["n_layer"],
        "n_head": sizes["n_head"],
        "d_model": sizes["n_embd"],
        "block_size": sizes["n_positions"],
        "vocab_size": sizes["vocab_size"],
        "dropout": float(dropout) if isinstance(dropout, (int, float)) else 0.0,
        "bias": True,
        "grad_checkpointing": False,
    }


def _differences(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """The settings in which this GPT-2 config computes something our model does not."""
    found = []
    if config.get("activation_function", "gelu_new") not in TANH_GELU:
        found.append(("activation_function", config.get("activation_function")))
    eps = config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
        found.append(("layer_norm_epsilon", eps))
    if config.get("tie_word_embeddings", True) is not True:
        found.append(("tie_word_embeddings", config.get("tie_word_embeddings")))
    n_inner, n_embd = config.get("n_inner"), config.get("n_embd")
    if n_inner is not None and (not isinstance(n_embd, int) or n_inner != 4 * n_embd):
        found.append(("n_inner", n_inner))
    for key, ours in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if config.get(key, ours) != ours:
            found.append((key, config.get(key)))
    return found


def _gpt2_value(key: str) -> str:
    return {
        "activation_function": "activation_function=gelu_new, the tanh GELU",
        "layer_norm_epsilon": f"layer_norm_epsilon={LAYER_NORM_EPS}",
        "tie_word_embeddings": "the output head tied to the token embedding",
        "n_inner": "an MLP of 4 * n_embd",
        "scale_attn_weights": "attention scaled by 1/sqrt(head size)",
        "scale_attn_by_inverse_layer_idx": "no per-layer attention scaling",
        "add_cross_attention": "no cross-attention",
    }[key]


def hf_config(model_config: dict[str, Any], token_ids: dict[str, int | None]) -> dict[str, Any]:
    """``config.json`` for ``transformers.GPT2Config``: every field that changes the output."""
    if not model_config.get("bias", True):
        raise CheckpointError(
            "a model trained with model.bias=false has no GPT-2 equivalent (transformers' GPT-2 "
            "always has biases); export it with --format minigpt instead"
        )
    dropout = model_config["dropout"]
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model_config["vocab_size"],
        "n_positions": model_config["block_size"],
        "n_embd": model_config["d_model"],
        "n_layer": model_config["n_layer"],
        "n_head": model_config["n_head"],
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
        "pad_token_id": None,
        "torch_dtype": "float32",
    }


def generation_config(token_ids: dict[str, int | None]) -> dict[str, Any]:
    """``generation_config.json``: the end-of-text ids; sampling settings stay the user's."""
    return {
        "_from_model_config": True,
        "bos_token_id": token_ids.get("bos_token_id"),
        "eos_token_id": token_ids.get("eos_token_id"),
    }


def from_hf(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A HF GPT-2 state dict in our names and layout, head tied; mask buffers dropped."""
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(MASK_BUFFERS):
            continue
        full = name if name.startswith(PREFIX) or name == HEAD else PREFIX + name
        ours[full] = tensor.t() if full.endswith(CONV1D) and tensor.dim() == 2 else tensor
    head = ours.pop(HEAD, None)
    embedding = ours.get(EMBEDDING)
    if head is not None and (embedding is None or not torch.equal(head, embedding)):
        raise CheckpointError(
            f"{where}: lm_head.weight differs from transformer.wte.weight (an untied head); "
            "minigpt's GPT ties them, as GPT-2 does"
        )
    if embedding is not None:
        ours[HEAD] = embedding
    return ours


def to_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in HF's layout, contiguous, the tied head stored once (as HF saves it)."""
    return {
        name: (tensor.t() if name.endswith(CONV1D) else tensor).contiguous()
        for name, tensor in tensors.items()
        if name != HEAD
    }
