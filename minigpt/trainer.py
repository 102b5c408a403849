"""The training loop: it orchestrates model, data, optimizer, checkpoints and trackers.

Step numbering: ``state.step`` counts optimizer steps done. Batch ``s`` is always the global batch
the sampler draws for step ``s``, so a run resumed at step ``s`` sees exactly what an uninterrupted
run would have seen, whatever the world size.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt import (
    checkpoint,
    distributed,
    peak,
    pretrained,
    preview,
    runfolder,
    runlock,
    runtime,
)
from minigpt.batches import BatchSampler, eval_batches
from minigpt.config import Config, ConfigError, as_dict
from minigpt.console import LOG_FILE, Console, Outcome, RunLog, error_line, start_line, summary
from minigpt.data import Corpus, prepare_corpus
from minigpt.distributed import Dist
from minigpt.model import GPT
from minigpt.optim import build_optimizer, lr_at, set_lr, warmup_warning
from minigpt.parallel import Parallel, is_sharded
from minigpt.runrecord import Throughput, WallClock, Window, finite_or_none, write_json
from minigpt.signals import StopRequested, StopSignals
from minigpt.tracking import JobInfo, build_tracker

RUN_FILE = runfolder.RUN_FILE
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk or quota: the user's to fix


class TrainingError(RuntimeError):
    """A run that cannot go on for a reason the user must act on (printed as one line)."""


@dataclass
class TrainState:
    """Counters that a checkpoint carries so that a resumed run continues the same run."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    bad_steps: int = 0  # consecutive steps skipped for a non-finite loss or gradient norm
    skipped_steps: int = 0  # all of them, for the logs


# pragma: no mutate start - set-up and output, not step logic (make mutation)
def train(
    cfg: Config,
    run_dir: str | os.PathLike[str],
    overrides: list[str] | None = None,
    job: JobInfo | None = None,
    record: dict[str, str] | None = None,
) -> float:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the final validation loss.

    ``record`` maps file names to the text that goes into ``run_dir/.hydra`` once the folder is
    ours (the composed config and overrides): a refused run writes nothing.
    Raises StopRequested after SIGUSR2/SIGTERM/SIGINT, once every rank has stopped at the same
    step and the checkpoint is written; the signal has then been handed to the handler it
    displaced (under submitit, rank 0's requeues the job and exits).
    """
    dist = distributed.setup(cfg.train.device, cfg.cluster.backend, cfg.cluster.init_timeout_s)
    stop = StopSignals().install()
    lock, log = None, RunLog(None)
    try:
        # Every rank must use rank 0's folder: their own Hydra may have picked another timestamp.
        run_dir = Path(distributed.broadcast_object(str(Path(run_dir).resolve()), dist))
        lock = _hold(run_dir, dist)
        log = RunLog(run_dir / LOG_FILE if dist.is_main else None)
        trainer = Trainer(cfg, run_dir, dist, overrides or [], job, stop, record or {}, log)
        return trainer.fit()
    except TrainingError as err:
        log.write(f"error: {err}")  # the line train.py prints, kept with the run
        raise
    except StopRequested as request:
        request.__traceback__ = None  # its frames hold the Trainer: let teardown free DDP first
        distributed.teardown(dist)
        # After SIGTERM only rank 0 asks SLURM (the other ranks' submitit handlers never requeue).
        asks = dist.is_main and request.signum == signal.SIGTERM
        stop.hand_over(request.signum, requeue=asks and distributed.slurm_job_running(dist))
        if not dist.is_main:
            request.exit_code = 0  # a failing follower would make srun kill rank 0 mid-requeue
        raise
    except OSError as err:
        if err.errno not in OUT_OF_SPACE:
            raise
        raise _logged(TrainingError(_out_of_space(err, Path(run_dir))), log) from err
    except (MemoryError, RuntimeError) as err:
        if not runtime.is_out_of_memory(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _logged(
            TrainingError(
                f"out of memory ({first[:200]}); lower train.batch_size (and raise "
                "train.grad_accum to keep the global batch), use a smaller model, or set "
                "model.grad_checkpointing=true; the last checkpoint, if any, is intact"
            ),
            log,
        ) from None
    finally:
        log.close()
        if lock is not None:
            lock.release()
        stop.uninstall()
        distributed.teardown(dist)


def _logged(err: TrainingError, log: RunLog) -> TrainingError:
    log.write(f"error: {err}")
    return err


def _hold(run_dir: Path, dist: Dist) -> runlock.RunLock | None:
    """Rank 0 takes the run folder for the whole job (its ranks are one holder); every rank
    learns whether it could, so that all of them stop together when another run has it."""
    lock, refusal = None, None
    if dist.is_main:
        try:
            lock = runlock.acquire(run_dir, dist.slurm_job_id, dist.slurm_restart_count)
        except runlock.RunFolderError as err:
            refusal = str(err)
    refusal = distributed.broadcast_object(refusal, dist)
    if refusal is not None:
        raise runlock.RunFolderError(refusal)
    return lock


# pragma: no mutate end
class Trainer:
    """One training run on this rank."""

    # pragma: no mutate start - set-up and output, not step logic (make mutation)
    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        dist: Dist,
        overrides: list[str],
        job: JobInfo | None = None,
        stop: StopSignals | None = None,
        record: dict[str, str] | None = None,
        log: RunLog | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.dist, self.overrides = cfg, run_dir, dist, overrides
        self.stop = stop or StopSignals()
        self.record = record or {}
        self.log = log or RunLog(None)  # train.log: opened once the run starts writing
        self.notes: list[str] = []  # what a resume found changed, for the console and run.json
        self.warnings = [w for w in [warmup_warning(cfg.optimizer, cfg.train.max_steps)] if w]
        self.data_change: dict[str, Any] | None = None
        self._saved_step = -1
        self.job = job or JobInfo()
        self.logger_run_id: str | None = None  # the W&B run; a checkpoint carries it to a resume
        self.startup_s: float | None = None
        self.device = torch.device(dist.device)
        self.init = self._plan_init()  # the model's shape and tokenizer, when init_from names them
        if self.init is not None:
            data = replace(cfg.data, tokenizer=self.init.tokenizer.name)
            self.cfg = cfg = replace(cfg, model=self.init.model, data=data)
        self.dtype = runtime.resolve_dtype(cfg.train.dtype, self.device.type, cfg.model.d_model)
        if cfg.train.parallel == "fsdp" and self.dtype == torch.float16:  # auto, GPU sans bf16
            self.dtype = torch.float32
            self.warnings.append(
                "train.dtype=auto: this GPU has no bf16 and train.parallel=fsdp shards no fp16 "
                "gradient scaler, so the run trains in float32"
            )
        runtime.check_dtype(self.dtype, self.device)
        runtime.check_compiler(cfg.train.compile, self.device)
        torch.manual_seed(cfg.train.seed)
        self.corpus = self._prepare_corpus()
        gpt_cfg = cfg.model.gpt_config(self.corpus.tokenizer.vocab_size)
        shards = dist.world_size if is_sharded(cfg.train.parallel, dist) else 1
        runtime.check_fits(gpt_cfg, self.device, shards)
        self.model = GPT(gpt_cfg)  # on the host: Parallel places it (sharded, a block at a time)
        # Sharded before the optimizer is built: fully_shard replaces the parameters.
        self.parallel = Parallel(
            self.model, cfg.train.parallel, dist, self.dtype, cfg.train.compile
        )
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.train.compile)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        world_batch = cfg.train.batch_size * cfg.train.grad_accum * dist.world_size
        self.sampler = BatchSampler(
            self.corpus.train, gpt_cfg.block_size, world_batch, cfg.train.seed
        )
        self.val_batches = eval_batches(
            self.corpus.val, gpt_cfg.block_size, cfg.train.batch_size, cfg.train.eval_steps
        )
        self.prompt = preview.val_prompt(self.corpus.val, self.corpus.tokenizer, gpt_cfg.block_size)
        self.state = TrainState()
        self.resumed_from = self._maybe_resume()
        if self.init is not None:
            if self.resumed_from is None:  # a resume continues its own weights, not the source's
                self.parallel.load(self.optimizer, self.init.weights())
            self.init.tensors = {}  # the model holds its own copy now
        self.step_model = self.parallel.wrap()
        self.flops_per_token = self.model.flops_per_token()
        self.peak_flops, self.peak_source = self._peak()

    # ---------------------------------------------------------------- set-up
    def _plan_init(self) -> pretrained.Init | None:
        """Rank 0 reads ``init_from`` first (a Hub model is fetched once), then the others read
        it from the cache; a refusal on rank 0 stops every rank with its message."""
        cfg = self.cfg
        if cfg.init_from is None:
            return None
        init, refusal = None, None
        if self.dist.is_main:
            try:
                init = pretrained.plan_init(cfg.init_from, cfg.model, cfg.data, self.overrides)
            except (ConfigError, checkpoint.CheckpointError) as err:
                refusal = err
        message = distributed.broadcast_object(str(refusal) if refusal else None, self.dist)
        if refusal is not None:
            raise refusal
        if message is not None:
            raise ConfigError(message)
        if not self.dist.is_main:
            init = pretrained.plan_init(cfg.init_from, cfg.model, cfg.data, self.overrides)
        return init

    def _prepare_corpus(self) -> Corpus:
        """Rank 0 tokenizes while the others wait, then they read its cache."""
        min_tokens = self.cfg.model.block_size + 1
        given = self.init.tokenizer if self.init is not None else None
        if self.dist.is_main:
            corpus = prepare_corpus(self.cfg.data, min_tokens=min_tokens, tokenizer=given)
        distributed.barrier(self.dist)
        if not self.dist.is_main:
            corpus = prepare_corpus(self.cfg.data, min_tokens=min_tokens, tokenizer=given)
        return corpus

    def _peak(self) -> tuple[float, str]:
        """Rank 0 measures the peak (or reads it from the cache) and tells the other ranks:
        ranks measuring at once on one CPU would each see a share of it."""
        found = None
        if self.dist.is_main:
            found = peak.peak_flops(self.device, self.dtype, peak.machine_cache_dir())
        return distributed.broadcast_object(found, self.dist)

    # pragma: no mutate end
    def _maybe_resume(self) -> Path | None:
        """Load the checkpoint rank 0 chose for this run folder, after checking it fits."""
        path, ckpt = self._choose_checkpoint()
        if path is None:
            return None
        if ckpt is None:  # on the host: load_state_dict copies each tensor to the model's device,
            # not the whole file to the GPU first; a sharded checkpoint's shards are read below
            ckpt = checkpoint.load(path, map_location="cpu", read="meta")
        runfolder.check_resumable(
            ckpt, path, asdict(self.model.config), self.corpus.tokenizer.state()
        )
        step = int(ckpt["train_state"]["step"])
        if step > self.cfg.train.max_steps:
            raise runlock.RunFolderError(
                f"train.max_steps={self.cfg.train.max_steps} is below step {step}, which the run "
                f"in {self.run_dir} has reached; give train.max_steps={step} or more, or give a "
                "new run its own hydra.run.dir"
            )
        self.notes, self.data_change = runfolder.resume_notes(
            ckpt, as_dict(self.cfg), runfolder.data_summary(self.corpus.meta)
        )
        if checkpoint.SHARDS in ckpt:  # onto this job's ranks, however many wrote them
            self.parallel.load_shards(self.optimizer, checkpoint.shard_folder(path, ckpt))
        else:
            self.parallel.load(self.optimizer, ckpt["model"], ckpt["optimizer"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self.state = TrainState(**ckpt["train_state"])
        self.logger_run_id = ckpt.get("logger_run_id")
        return path

    def _choose_checkpoint(self) -> tuple[Path | None, dict[str, Any] | None]:
        """Rank 0 alone looks at (and may tidy) the run folder; the others load its choice."""
        path, ckpt, refusal = None, None, None
        if self.dist.is_main:
            try:
                path, ckpt = runfolder.start_from(self.cfg.resume, self.run_dir, self._say)
            except (ConfigError, checkpoint.CheckpointError) as err:
                refusal = str(err)
        chosen = distributed.broadcast_object((str(path) if path else None, refusal), self.dist)
        if chosen[1] is not None:
            raise runlock.RunFolderError(chosen[1])
        return (Path(chosen[0]) if chosen[0] else None), ckpt

    # pragma: no mutate start - set-up and output, not step logic (make mutation)
    def _say(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)
            self.log.write(message)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> float:
        """Run until ``train.max_steps``; returns the last validation loss."""
        cfg, main = self.cfg.train, self.dist.is_main
        if self.resumed_from is not None and self.state.step >= cfg.max_steps:
            return self._complete()
        self._write_record()
        tracker = build_tracker(
            self.cfg.logger,
            self.run_dir,
            enabled=main,
            resume_step=self.state.step if self.resumed_from else None,
            config={**as_dict(self.cfg), "params": self.model.num_params()},
            job=self.job,
            run_id=self.logger_run_id,
        )
        self.logger_run_id = tracker.run_id or self.logger_run_id
        resumed = self.resumed_from is not None
        self.clock = WallClock(self.run_dir, resumed)
        self.throughput = Throughput(self.run_dir, resumed)
        self.log.open()
        console = Console(cfg.progress, cfg.max_steps, self.state.step, main, self.log)
        self._announce(console)
        self._write_run_json("running")
        val_loss, status, reason = math.nan, "failed", ""
        try:
            val_loss = self._loop(tracker, console)
            status = "completed"
        except StopRequested as request:
            status, reason = "interrupted", str(request)
            raise
        except BaseException as err:
            reason = error_line(err)
            raise
        finally:
            console.close()
            tracker.finish(status)
            try:
                self._write_run_json(status, final_val_loss=val_loss)
            except OSError:
                if status != "failed":
                    raise
                # The disk that just failed us (full, over quota) must not hide the first error.
            for line in summary(self._outcome(status, val_loss, reason)):
                console.print(line)
        return val_loss

    def _announce(self, console: Console) -> None:
        """The start line, then what the run found and what it warns about (rank 0)."""
        if not self.dist.is_main:
            return
        cfg = self.cfg
        what = (
            f"model={cfg.model.name} ({self.model.num_params() / 1e6:.2f}M parameters) on "
            f"{self.device.type} {str(self.dtype).removeprefix('torch.')}"
        )
        if self.dist.world_size > 1:
            what += f" x {self.dist.world_size} ranks"
        step, steps = self.state.step, cfg.train.max_steps
        console.print(start_line(self.run_dir, what, self.resumed_from, step, steps))
        if self.init is not None and self.resumed_from is None:
            console.print(f"initialised from {self.init.describe()}")
        for tmp in checkpoint.remove_leftovers(checkpoint.checkpoint_dir(self.run_dir)):
            console.print(f"removed {tmp.name}, left by a save that was killed")
        for line in [*self.notes, *self.warnings]:
            console.print(line)

    def _outcome(self, status: str, val_loss: float, reason: str) -> Outcome:
        return Outcome(
            status=status,
            step=self.state.step,
            max_steps=self.cfg.train.max_steps,
            run_dir=self.run_dir,
            wall_time_s=self.clock.seconds(),
            final_val_loss=val_loss if math.isfinite(val_loss) else None,
            best_val_loss=finite_or_none(self.state.best_val_loss),
            tokens_seen=self.state.tokens_seen,
            tokens_per_sec=self.throughput.mean("tokens_per_sec"),
            mfu=self.throughput.mean("mfu"),
            reason=reason,
        )

    # pragma: no mutate end
    def _loop(self, tracker: Any, console: Console) -> float:
        cfg = self.cfg.train
        window = Window(self.device)
        val_loss = math.nan
        self.startup_s = runtime.seconds_since_launch()
        while self.state.step < cfg.max_steps:
            loss, grad_norm, lr = self._train_step()
            self.state.step += 1
            window.add(
                loss, self.sampler.global_batch * self.sampler.block_size // self.dist.world_size
            )
            step = self.state.step
            last = step == cfg.max_steps
            metrics: dict[str, Any] = {}
            if step % cfg.log_every == 0 or last:
                metrics = self._train_metrics(window, grad_norm, lr)
            if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                val_loss = self.evaluate()
                metrics |= {"val/loss": val_loss, "val/perplexity": _ppl(val_loss)}
            if metrics:
                tracker.log(step, metrics)
                console.step(step, metrics)
            if "val/loss" in metrics or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
                self._checkpoint(metrics.get("val/loss"))
            shown = (cfg.sample_every and step % cfg.sample_every == 0) or last
            if shown or "val/loss" in metrics:  # every evaluation adds a row to the samples table
                self._show_sample(tracker, console, echo=bool(shown))
            if not math.isfinite(grad_norm):
                console.print(
                    f"step {step}: non-finite loss or gradient norm, optimizer step skipped on "
                    f"every rank ({self.state.bad_steps} in a row, at most {cfg.max_bad_steps})"
                )
            self._stop_if_requested()
        return val_loss

    def _stop_if_requested(self) -> None:
        """At a step boundary: if any rank got a stop signal, all save and stop here together."""
        signum = self.stop.signum or 0
        if self.dist.is_distributed:  # one tiny all-reduce per step keeps the ranks in step
            flag = torch.tensor([float(signum)], device=self.device)
            signum = int(distributed.all_reduce_max(flag, self.dist).item())
        if not signum:
            return
        if self._saved_step != self.state.step:
            self._checkpoint(None)
        distributed.barrier(self.dist)  # the checkpoint is on disk before anyone moves on
        raise StopRequested(signum, self.state.step)

    def _train_step(self) -> tuple[torch.Tensor, float, float]:
        cfg, dist = self.cfg.train, self.dist
        set_lr(self.optimizer, lr_at(self.state.step, self.cfg.optimizer, cfg.max_steps))
        lr = _applied_lr(self.optimizer)  # what the logs report is what the optimizer used
        self.step_model.train()
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.sampler.batch(
                self.state.step, dist.rank, dist.world_size, micro, cfg.grad_accum
            )
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # Dropout masks depend on the seed, the step and the slice of the global batch, not on
            # which rank draws them: a run resumed on another world size stays bit-identical.
            # Without dropout a step draws no random number, and reseeding costs ~1.5 ms.
            if self.model.config.dropout > 0:
                part = dist.rank * cfg.grad_accum + micro
                torch.manual_seed(_dropout_seed(cfg.seed, self.state.step, part))
            # Only the last micro-step communicates gradients: earlier ones accumulate locally.
            sync = micro == cfg.grad_accum - 1
            with (
                self.parallel.micro_step(self.step_model, sync),
                runtime.autocast(self.device.type, self.dtype),
            ):
                _, loss = self.step_model(x, y)
                loss = loss / cfg.grad_accum
            self.scaler.scale(loss).backward()
            total += loss.detach()
        grad_norm = self._clip_and_step()
        self.state.tokens_seen += self.sampler.global_batch * self.sampler.block_size
        return total, grad_norm, lr

    def _clip_and_step(self) -> float:
        """Clip, then step unless the global gradient is non-finite (the same on every rank)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optimizer.grad_clip or math.inf
        norm = self.parallel.clip_grad_norm(max_norm)
        finite = math.isfinite(norm)
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # GradScaler skips non-finite fp16 steps itself
            self.scaler.update()  # (and lowers its scale): skipped all the same, counted below
        if finite:
            self.state.bad_steps = 0
        else:
            self.state.bad_steps += 1
            self.state.skipped_steps += 1
            if self.state.bad_steps >= self.cfg.train.max_bad_steps:
                raise TrainingError(
                    f"{self.state.bad_steps} consecutive steps had a non-finite gradient at step "
                    f"{self.state.step}; lower optimizer.lr or raise optimizer.warmup_steps "
                    "(the last good checkpoint is kept)"
                )
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _train_metrics(self, window: Window, grad_norm: float, lr: float) -> dict[str, Any]:
        loss, tokens_per_sec, seconds_per_step = window.flush(self.dist)
        metrics = {
            "train/loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens_per_sec * self.dist.world_size,
            "step_time_ms": seconds_per_step * 1e3,
            "mfu": self.flops_per_token * tokens_per_sec / self.peak_flops,
            "tokens_seen": self.state.tokens_seen,
            "skipped_steps": self.state.skipped_steps,
            **runtime.memory_metrics(self.device),
        }
        self.throughput.add(metrics)
        return metrics

    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches, shared out among ranks.

        ``no_grad`` is a ``with``, not a decorator: mutmut leaves decorated functions alone.
        """
        self.model.eval()
        sums = torch.zeros(2, device=self.device)
        n, world = len(self.val_batches), self.dist.world_size
        # A sharded forward is a collective: every rank runs as many as the busiest one, and a
        # rank past the end repeats batch 0 without counting it.
        stop = -(-n // world) * world if self.parallel.sharded else n
        with torch.no_grad():
            for i in range(self.dist.rank, stop, world):
                x, y = (t.to(self.device) for t in self.val_batches[i if i < n else 0])
                with runtime.autocast(self.device.type, self.dtype):
                    _, loss = self.model(x, y)
                counted = float(i < n)
                sums += torch.stack(
                    [loss.float() * counted, torch.full((), counted, device=self.device)]
                )
        self.parallel.reshard()
        distributed.all_reduce_sum(sums, self.dist)
        return float(sums[0] / sums[1])

    # pragma: no mutate start - set-up and output, not step logic (make mutation)
    def _complete(self) -> float:
        """The run already reached train.max_steps: say so and return its recorded result.

        Nothing is written, unless the run was stopped between its last checkpoint and its
        final run.json: then it is evaluated once and completed.
        """
        info = distributed.broadcast_object(runfolder.read_run_json(self.run_dir), self.dist)
        recorded = info.get("final_val_loss")
        done = info.get("status") == "completed" and info.get("steps") == self.state.step
        if done and isinstance(recorded, (int, float)):
            val_loss = float(recorded)
        else:
            val_loss = self.evaluate()
            self.clock = WallClock(self.run_dir, resumed=True)
            self.throughput = Throughput(self.run_dir, resumed=True)
            self._write_run_json("completed", final_val_loss=val_loss)
        self._say(
            f"the run in {self.run_dir} is complete: step {self.state.step}/"
            f"{self.cfg.train.max_steps}, final val loss {val_loss:.4f}; nothing to do "
            "(raise train.max_steps to train it further)"
        )
        return val_loss

    # ---------------------------------------------------------------- outputs
    def _write_record(self) -> None:
        """Hydra's record of this attempt (.hydra/), written only once the folder is ours."""
        if not self.dist.is_main or not self.record:
            return
        folder = self.run_dir / ".hydra"
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in self.record.items():
            (folder / name).write_text(text, encoding="utf-8")

    # pragma: no mutate end
    def _checkpoint(self, val_loss: float | None) -> None:
        """Save step_N.pt = last.pt (and best.pt on a new best); rank 0 writes it, and under
        ``fsdp`` every rank first writes its shards (see :mod:`minigpt.checkpoint`).

        Every rank calls it with the same (all-reduced) ``val_loss``, so all agree on the best.
        No generator state is saved: the only random numbers training draws are dropout's, and
        those are reseeded from (seed, step, slice) at every micro-step (see ``_train_step``).
        """
        is_best = val_loss is not None and val_loss < self.state.best_val_loss
        if is_best:
            self.state.best_val_loss = val_loss
        self._saved_step = self.state.step
        folder = checkpoint.checkpoint_dir(self.run_dir)
        shards = None
        if self.parallel.sharded:
            shards = checkpoint.shards_tmp(folder, self.state.step)
            self.parallel.save_shards(self.optimizer, shards)  # returns once all ranks wrote
        if not self.dist.is_main:
            return
        state = self._checkpoint_state(with_tensors=shards is None)
        checkpoint.save_step(
            state,
            folder,
            self.state.step,
            keep_last=self.cfg.train.keep_last,
            best=is_best,
            shards=shards,
        )

    def _checkpoint_state(self, with_tensors: bool = True) -> dict[str, Any]:
        """All a resume needs; ``with_tensors`` False: all but the model and optimizer state
        (in the shards), plus the parameters' order, which numbers the optimizer's state, and
        the tied names the shards hold once."""
        if with_tensors:
            model_state, optimizer_state = self.parallel.state_dicts(self.optimizer)
            tensors = {"model": model_state, "optimizer": optimizer_state}
        else:
            tensors = {
                "param_order": self.parallel.param_order(self.optimizer),
                "aliases": self.parallel.aliases(),
            }
        state = {
            **tensors,
            "model_config": asdict(self.model.config),
            "tokenizer": self.corpus.tokenizer.state(),
            "sampler": self.sampler.state_dict(),
            "train_state": asdict(self.state),
            "config": as_dict(self.cfg),
            "data": runfolder.data_summary(self.corpus.meta),
            "logger_run_id": self.logger_run_id,
        }
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    # pragma: no mutate block - output, not step logic (make mutation)
    def _show_sample(self, tracker: Any, console: Console, echo: bool = True) -> None:
        if not self.dist.is_main and not self.parallel.sharded:
            return  # a sharded model samples on every rank: each forward is a collective
        tok, seed = self.corpus.tokenizer, self.cfg.train.seed
        text = preview.sample_text(self.model, tok, self.prompt, seed, self.device)
        self.parallel.reshard()
        if not self.dist.is_main:
            return
        tracker.log(self.state.step, {"sample": text})
        if echo:
            console.print(f"--- sample at step {self.state.step} ---\n{text}\n---")

    def _write_run_json(self, status: str, **extra: Any) -> None:
        if not self.dist.is_main:
            return
        info = {
            "status": status,
            "overrides": self.overrides,
            "config": as_dict(self.cfg),
            "params": self.model.num_params(),
            "params_non_embedding": self.model.num_params(non_embedding=True),
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak_flops,
            "peak_flops_source": self.peak_source,
            **self.throughput.record(),  # mfu and tokens_per_sec: mean and last
            "warnings": self.warnings,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "world_size": self.dist.world_size,
            "distributed": self.dist.describe(),
            "global_batch": self.sampler.global_batch,
            "data": self.corpus.meta,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "resume_notes": self.notes,
            "data_changed": self.data_change,
            "versions": runtime.versions(),
            "steps": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "best_val_loss": finite_or_none(self.state.best_val_loss),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "started_at": self.clock.started_at,
            "wall_time_s": self.clock.seconds(),
            "startup_s": self.startup_s,  # launch to the first step (seconds)
            "memory_peak": runtime.peak_memory(self.device),
            "logger_run_id": self.logger_run_id,
            **extra,
        }
        write_json(self.run_dir / RUN_FILE, info)


def _applied_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate every parameter group steps with; groups that disagree are a bug (a
    group left at another rate would train unseen by the logs)."""
    rates = {float(group["lr"]) for group in optimizer.param_groups}
    if len(rates) != 1:
        raise RuntimeError(f"the optimizer's parameter groups disagree on the lr: {sorted(rates)}")
    return rates.pop()


def _dropout_seed(seed: int, step: int, part: int) -> int:
    """A well-mixed 64-bit seed for one micro-batch slice of one step."""
    return int(np.random.SeedSequence([seed, step, part]).generate_state(1, np.uint64)[0])


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 50 else math.inf


# pragma: no mutate block - an error message (make mutation)
def _out_of_space(err: OSError, run_dir: Path) -> str:
    """Why the run stopped and what it kept: a full disk (or quota) is the user's to fix."""
    folder = checkpoint.checkpoint_dir(run_dir)
    last = folder / checkpoint.LAST
    kept = "no checkpoint was written before it"
    if last.exists():
        same = [p for p in checkpoint.step_checkpoints(folder) if os.path.samefile(p, last)]
        kept = f"the last good checkpoint, {last}" + (f" = {same[0].name}" if same else "")
        kept += ", is intact"
    return (
        f"{err.strerror} writing {err.filename or f'into {run_dir}'}; {kept}. Free some space "
        "(fewer step files: train.keep_last) and run the same command again to resume"
    )
