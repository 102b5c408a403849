"""What a run will cost, worked out from its config alone: the dry run of a sweep prints this."""

from __future__ import annotations

from dataclasses import dataclass

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
