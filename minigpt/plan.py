"""What a run will cost, worked out from its config alone: the dry run of a sweep prints this."""

from __future__ import annotations

from dataclasses import dataclass, replace

from minigpt.config import Config
from minigpt.model import GPT, GPTConfig

_TOKENIZER_VOCAB = {"byte": 256, "gpt2": 50257}


@dataclass(frozen=True)
class RunPlan:
    """The figures a researcher checks before paying for a submission."""

    world_size: int
    global_batch: int  # sequences per optimizer step
    tokens_per_step: int
    params: int
    tokens: int  # to train, over train.max_steps
    train_flops: float
    note: str = ""  # why the sizes may not be the run's

    def describe(self) -> str:
        return (
            f"world size {self.world_size}, global batch {self.global_batch} seq "
            f"({self.tokens_per_step:,} tokens/step), {self.params / 1e6:.2f}M params, "
            f"{self.tokens / 1e6:.2f}M tokens to train, {self.train_flops:.2e} FLOPs{self.note}"
        )


def vocab_size_of(cfg: Config) -> int:
    """The tokenizer's vocabulary without building it (BPE is trained up to data.vocab_size)."""
    return _TOKENIZER_VOCAB.get(cfg.data.tokenizer, cfg.data.vocab_size)


def plan_run(cfg: Config, world_size: int) -> RunPlan:
    """Sizes of the run ``cfg`` describes on ``world_size`` ranks."""
    gpt, note = _model_of(cfg)
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world_size
    tokens_per_step = global_batch * gpt.block_size
    tokens = tokens_per_step * cfg.train.max_steps
    params = GPT.param_count_formula(gpt)
    flops = GPT.flops_per_token_formula(gpt) * tokens
    return RunPlan(world_size, global_batch, tokens_per_step, params, tokens, flops, note)


def _model_of(cfg: Config) -> tuple[GPTConfig, str]:
    """The run's model: ``init_from``'s shape when its config can be read without a download."""
    if cfg.init_from is None:
        return cfg.model.gpt_config(vocab_size_of(cfg)), ""
    from minigpt.pretrained import source_shape

    shape = source_shape(cfg.init_from)
    if shape is None:
        return cfg.model.gpt_config(vocab_size_of(cfg)), (
            f" (sizes of model={cfg.model.name}: init_from={cfg.init_from} is not here or in "
            "the local Hugging Face cache, so its shape is unknown until the run fetches it)"
        )
    return shape, ""  # its block_size: a smaller model.block_size on the command line would crop it


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes on each GPU under one ``train.parallel``, before the allocator's slack.

    Weights, gradients and AdamW's two moments are fp32 (the master copy under mixed precision).
    ``fsdp`` keeps a 1/world shard of each, plus the weights it gathers: the root unit
    (embeddings, final norm), which stays gathered through a step, and two blocks at a time (one
    running, one prefetched), in the compute dtype. Activations are one micro-batch's: ~34
    bytes per token and channel per layer in 16-bit compute with fused attention (Korthikanti et
    al. 2022, without the s² term fused attention does not store), twice that in fp32; with
    ``model.grad_checkpointing`` only each block's input, plus one block recomputed; and the
    logits, kept in the compute dtype and in fp32 for the loss and its gradient.
    """

    parallel: str
    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        gib = 2**30
        return (
            f"{self.parallel}: {self.total / gib:,.1f} GiB/GPU (weights {self.params / gib:,.1f}, "
            f"gradients {self.grads / gib:,.1f}, AdamW {self.optimizer / gib:,.1f}, "
            f"activations {self.activations / gib:,.1f})"
        )


def plan_memory(cfg: Config, world_size: int, parallel: str) -> MemoryPlan:
    """Per-GPU memory of the run ``cfg`` describes on ``world_size`` CUDA ranks (see
    :class:`MemoryPlan` for what is counted)."""
    gpt, _ = _model_of(cfg)
    act = 4 if cfg.train.dtype == "float32" else 2  # auto is bf16 (or fp16) on a GPU
    params = GPT.param_count_formula(gpt)
    tokens = cfg.train.batch_size * gpt.block_size
    per_layer = 17 * act * tokens * gpt.d_model  # 34 bytes a token and channel at 16 bits
    if gpt.grad_checkpointing:
        activations = gpt.n_layer * act * tokens * gpt.d_model + per_layer
    else:
        activations = gpt.n_layer * per_layer
    activations += tokens * gpt.vocab_size * (act + 4 + 4)
    if parallel != "fsdp" or world_size == 1:
        return MemoryPlan(parallel, 4 * params, 4 * params, 8 * params, activations)
    root = GPT.param_count_formula(replace(gpt, n_layer=0))  # embeddings and final norm
    block = (params - root) // gpt.n_layer
    gathered = act * (root + 2 * block)
    shard = -(-params // world_size)
    return MemoryPlan(parallel, 4 * shard + gathered, 4 * shard + 4 * block, 8 * shard, activations)


# The CUDA context, NCCL's buffers and the allocator's fragmentation take the rest.
FIT_SHARE = 0.9


def fit_warning(memory: MemoryPlan, gpu_memory_gb: float | None) -> str | None:
    """Why a run will not fit the GPUs the cluster preset declares (``cluster.gpu_memory_gb``,
    in GiB as nvidia-smi shows it), with what would make it fit; None when it fits or the size
    is not declared."""
    if gpu_memory_gb is None or memory.total <= FIT_SHARE * gpu_memory_gb * 2**30:
        return None
    fixes = "a smaller train.batch_size (with more train.grad_accum), model.grad_checkpointing=true"
    if memory.parallel == "ddp":
        fixes = f"train.parallel=fsdp, {fixes}"
    else:
        fixes = f"more GPUs (hydra.launcher.nodes), {fixes}"
    return (
        f"will not fit: {memory.describe()} is more than {FIT_SHARE:.0%} of "
        f"cluster.gpu_memory_gb={gpu_memory_gb:g}; try {fixes}"
    )
