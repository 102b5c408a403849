"""What a run will cost, worked out from its config alone: the dry run of a sweep prints this."""

from __future__ import annotations

from dataclasses import dataclass

from minigpt.config import Config
from minigpt.model import GPT

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

    def describe(self) -> str:
        return (
            f"world size {self.world_size}, global batch {self.global_batch} seq "
            f"({self.tokens_per_step:,} tokens/step), {self.params / 1e6:.2f}M params, "
            f"{self.tokens / 1e6:.2f}M tokens to train, {self.train_flops:.2e} FLOPs"
        )


def vocab_size_of(cfg: Config) -> int:
    """The tokenizer's vocabulary without building it (BPE is trained up to data.vocab_size)."""
    return _TOKENIZER_VOCAB.get(cfg.data.tokenizer, cfg.data.vocab_size)


def plan_run(cfg: Config, world_size: int) -> RunPlan:
    """Sizes of the run ``cfg`` describes on ``world_size`` ranks."""
    gpt = cfg.model.gpt_config(vocab_size_of(cfg))
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world_size
    tokens_per_step = global_batch * gpt.block_size
    tokens = tokens_per_step * cfg.train.max_steps
    params = GPT.param_count_formula(gpt)
    flops = GPT.flops_per_token_formula(gpt) * tokens
    return RunPlan(world_size, global_batch, tokens_per_step, params, tokens, flops)
