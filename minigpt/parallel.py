"""How the model is spread over the job's ranks: ``ddp`` or ``fsdp`` (``train.parallel``).

``ddp`` keeps a full copy of the weights, gradients and AdamW state on every rank (16 bytes per
parameter in fp32) and all-reduces the gradients. ``fsdp`` is PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``) on every transformer block and on the root, as
torchtitan applies it: each rank keeps a 1/world shard of all three, all-gathers a block's
weights just before it runs and reduce-scatters its gradients after. A single process runs the
plain model either way.

The trainer asks this module for the module to step, the accumulation context, the clipped
gradient norm and the state to save or load; nothing else in the package knows which of the two
runs. A sharded run saves each rank's shards with torch.distributed.checkpoint (DCP), so no
process ever holds the whole state; any run loads such shards onto its own ranks.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from minigpt.checkpoint import FRESH, CheckpointError
from minigpt.distributed import Dist
from minigpt.model import GPT


def is_sharded(mode: str, dist: Dist) -> bool:
    """``train.parallel=fsdp`` shards only a job of several processes."""
    return mode == "fsdp" and dist.is_distributed


class Parallel:
    """The model as this rank holds it, and the few operations that depend on how."""

    def __init__(
        self, model: GPT, mode: str, dist: Dist, dtype: torch.dtype, compile: bool = False
    ) -> None:
        self.model, self.dist, self.compile = model, dist, compile
        self.sharded = is_sharded(mode, dist)
        if self.sharded:  # fully_shard moves a unit to the device and keeps its shard: the GPU
            # never holds the whole model, only one block whole at a time
            _shard(model, torch.device(dist.device), dtype, dist.world_size, compile)
        else:
            model.to(dist.device)

    def wrap(self) -> torch.nn.Module:
        """The module the training step calls: DDP's wrapper (built after any resume, so its
        broadcast from rank 0 sends the loaded weights), the sharded model itself (its blocks
        compiled, on request, before sharding), or the plain one; compiled on request."""
        wrapped: torch.nn.Module = self.model
        if self.sharded:
            return wrapped
        if self.dist.is_distributed:
            device = torch.device(self.dist.device)
            ids = [device.index] if device.type == "cuda" else None
            wrapped = DistributedDataParallel(self.model, device_ids=ids)
        if self.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def micro_step(
        self, step_model: torch.nn.Module, sync: bool
    ) -> contextlib.AbstractContextManager:
        """Gradients are communicated on the last micro-step only. DDP: its public ``no_sync``.
        FSDP: no reduce-scatter, and the gathered weights stay gathered until the last
        micro-step's backward, so accumulation costs one all-gather per block, not one per
        micro-step. (Not a generator: mutmut leaves decorated functions alone.)"""
        if self.sharded:
            assert isinstance(self.model, FSDPModule)
            self.model.set_requires_gradient_sync(sync)
            self.model.set_reshard_after_backward(sync)
            return contextlib.nullcontext()
        ddp = getattr(step_model, "_orig_mod", step_model)
        if sync or not isinstance(ddp, DistributedDataParallel):
            return contextlib.nullcontext()
        return ddp.no_sync()

    def clip_grad_norm(self, max_norm: float) -> float:
        """The norm of the whole gradient (every shard's part), the same on every rank."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm)

    def state_dicts(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The full model and optimizer state of an unsharded model (the same on every rank)."""
        assert not self.sharded, "a sharded model saves its shards: save_shards"
        return self.model.state_dict(), optimizer.state_dict()

    def save_shards(self, optimizer: torch.optim.Optimizer, folder: str | os.PathLike) -> None:
        """Every rank writes its own shards of the model and optimizer state into ``folder``
        (a collective: DCP's metadata is written once all ranks have written theirs)."""
        fresh = not optimizer.state  # no step taken yet (or every one skipped as non-finite)
        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        model_sd = self._unaliased(model_sd)
        if fresh:  # get_state_dict made AdamW's state with a zero step: step counter 1, which
            optimizer.state.clear()  # would change the first real step's bias correction
        state = {"model": model_sd, "optimizer": optim_sd, FRESH: torch.tensor(fresh)}
        writer = dcp.FileSystemWriter(str(folder), sync_files=True)  # fsync'd before published
        try:
            dcp.save(state, storage_writer=writer)
        except CheckpointException as err:  # a full disk is an OSError, as a single-file save's
            cause = _first_failure(err)
            if isinstance(cause, OSError) and cause.errno:
                raise OSError(cause.errno, cause.strerror, str(folder)) from err
            raise

    def load_shards(self, optimizer: torch.optim.Optimizer, folder: str | os.PathLike) -> None:
        """Load a sharded checkpoint written by any number of ranks: each rank reads the parts
        of its own shards (DCP reshards), an unsharded model reads everything."""
        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        state = {
            "model": self._unaliased(model_sd),
            "optimizer": optim_sd,
            FRESH: torch.tensor(False),
        }
        with warnings.catch_warnings():  # one process reading a checkpoint: as meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            try:
                dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)))
            except CheckpointException as err:
                cause = _first_failure(err)
                raise CheckpointError(
                    f"the shards in {folder} cannot be read ({type(cause).__name__}: "
                    f"{str(cause).splitlines()[0] if str(cause) else ''}); use another "
                    "checkpoint, e.g. an older one in the same folder"
                ) from None
        for alias, name in self.aliases().items():
            state["model"][alias] = state["model"][name]
        set_state_dict(
            self.model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        if bool(state[FRESH]):
            optimizer.state.clear()

    def load(
        self,
        optimizer: torch.optim.Optimizer,
        model_sd: dict[str, Any],
        optim_sd: dict[str, Any] | None = None,
    ) -> None:
        """Load full state (every rank holds it) into this rank's part of the model and, when
        given, the optimizer."""
        if not self.sharded:
            self.model.load_state_dict(model_sd)
            if optim_sd is not None:
                optimizer.load_state_dict(optim_sd)
            return
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, model_sd, options=options)
        if optim_sd is not None:
            named = _by_name(optim_sd, self.param_order(optimizer))
            set_optimizer_state_dict(self.model, optimizer, named, options=options)

    def reshard(self) -> None:
        """Free the gathered weights a forward without backward left behind (the root's and the
        last block's stay gathered after forward, for the backward that training runs next)."""
        if self.sharded:
            for module in self.model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def local_numel(self, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
        """Elements this rank stores for the parameters and for the optimizer's state."""
        self.reshard()
        params = sum(_local(p).numel() for p in self.model.parameters())
        state = sum(
            _local(v).numel()
            for s in optimizer.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
        return params, state

    def aliases(self) -> dict[str, str]:
        """Names under which a parameter appears again, to the name it first has: the head tied
        to the token embedding (``lm_head.weight`` -> ``transformer.wte.weight``). A state dict
        lists both; DCP would write the matrix twice."""
        first: dict[int, str] = {}
        found = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in first:
                found[name] = first[id(param)]
            else:
                first[id(param)] = name
        return found

    def _unaliased(self, model_sd: dict[str, Any]) -> dict[str, Any]:
        """``model_sd`` without the alias names: the tied head written once, as the embedding."""
        aliases = self.aliases()
        return {k: v for k, v in model_sd.items() if k not in aliases}

    def param_order(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Parameter names in the optimizer's index order (groups in order, then parameters)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _shard(
    model: GPT, device: torch.device, dtype: torch.dtype, world_size: int, compile: bool
) -> None:
    """FSDP2 on each block, then on the root (embeddings, final norm, head: one unit, so the
    tied embedding and head weight stay one parameter). On CUDA in bf16, weights are gathered
    and computed in bf16 while gradients are reduced, and the master weights and AdamW state
    kept, in fp32. ``compile`` compiles each block in place first, as torchtitan does: the
    gathers between blocks stay outside the compiled graphs."""
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = list(model.transformer.h)
    for i, block in enumerate(blocks):
        if compile:
            block.compile()
        # The last block's weights are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _first_failure(err: CheckpointException) -> BaseException:
    """The exception of the lowest rank that failed (DCP gathers every rank's)."""
    failures = err.failures
    return failures[min(failures)][0] if failures else err


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _by_name(optim_sd: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """Index-keyed optimizer state (``Optimizer.state_dict``'s) keyed by parameter name, as
    ``set_optimizer_state_dict`` takes it; the reverse of :func:`minigpt.checkpoint.by_index`."""
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in optim_sd["param_groups"]]
    state = {order[int(i)]: s for i, s in optim_sd["state"].items()}
    return {"state": state, "param_groups": groups}
