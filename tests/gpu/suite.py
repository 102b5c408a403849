"""What the GPU suite's tests share: the mode they run in, the skip marks, and the runs of
``train.py`` they read (started together by tests/gpu/conftest.py, see there).

Modes:

* on a machine with CUDA: the real thing, on ``cuda:0``, a few hundred steps per run;
* ``MINIGPT_GPU_DRY_RUN=1``: the same tests on CPU with fewer steps, to check the test code
  itself before spending GPU minutes: bf16 autocast, torch.compile, gloo in place of NCCL,
  exact resume, sampling and the KV cache run there (compile, resume and the SDPA check in
  float32: CPUs without bf16 units take minutes over bf16); what only a GPU can show (fused
  AdamW, the GPU's memory figures, Hopper's bf16, fp16 with the scaler, ...) skips, naming
  the dry run;
* neither: every test skips with the reason CUDA is unavailable.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from minigpt import checkpoint, distributed
from tests.conftest import ALPHABET_LINE, ROOT, clean_env, free_port, text_data_args

DRY_RUN = os.environ.get("MINIGPT_GPU_DRY_RUN", "") == "1"
ON_GPU = torch.cuda.is_available() and not DRY_RUN
DEVICE = "cuda" if ON_GPU else "cpu"
DRY_RUN_NOTE = "dry run (MINIGPT_GPU_DRY_RUN=1) on CPU"


def _no_cuda_reason() -> str:
    if torch.version.cuda is None and torch.version.hip is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            why += f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})"
    return f"CUDA is not available: {why}; MINIGPT_GPU_DRY_RUN=1 runs the suite on CPU"


# Every module of the suite carries these: the gpu marker, and a skip where there is no GPU to
# test and no dry run was asked for.
SUITE_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_GPU or DRY_RUN), reason=_no_cuda_reason()),
]


def cuda_only(what: str) -> pytest.MarkDecorator:
    """For a test only a GPU can make: skipped in the dry run, saying so."""
    return pytest.mark.skipif(DRY_RUN, reason=f"{DRY_RUN_NOTE}: {what} needs CUDA")


def gpu_or_dry(gpu: Any, dry: Any) -> Any:
    """The GPU's value, or the dry run's (fewer steps, CPU-friendly settings)."""
    return gpu if ON_GPU else dry


# ---------------------------------------------------------------- the corpus and what it teaches
def write_alphabet_corpus(folder: Path) -> Path:
    """20 files of the alphabet, one per line: a run that learns it is easy to recognise."""
    folder.mkdir(parents=True)
    for i in range(20):
        (folder / f"doc{i:02d}.txt").write_text(ALPHABET_LINE * 40)
    return folder


def unigram_entropy(text: str) -> float:
    """Entropy in nats of the byte distribution: the loss of a model that ignores context."""
    counts = Counter(text.encode())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


UNTRAINED_LOSS = math.log(256)  # a byte model's loss before it learns anything
# What "the loss fell" means: a few hundred GPU steps learn the sequence (a quarter of what a
# model that ignores context reaches, as tests/integration/test_train.py asks on CPU); the dry
# run's few dozen CPU steps must take a quarter off the untrained loss.
LEARNED = gpu_or_dry(0.25 * unigram_entropy(ALPHABET_LINE), 0.75 * UNTRAINED_LOSS)


# ---------------------------------------------------------------- runs of train.py
@dataclass
class Run:
    """A finished ``train.py`` process and its run folder."""

    run_dir: Path
    returncode: int
    stdout: str
    stderr: str

    def succeeded(self) -> Run:
        assert self.returncode == 0, f"train.py failed ({self.returncode}):\n{self.stderr[-4000:]}"
        return self

    def metrics(self) -> list[dict[str, Any]]:
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def train_events(self) -> list[dict[str, Any]]:
        return [e for e in self.metrics() if "train/loss" in e]

    def val_losses(self) -> list[tuple[int, float]]:
        return [(e["step"], e["val/loss"]) for e in self.metrics() if "val/loss" in e]

    def info(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "run.json").read_text())

    def checkpoint(self, name: str = checkpoint.LAST) -> dict[str, Any]:
        return checkpoint.load(self.run_dir / "checkpoints" / name)


def train_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    """The overrides of a tiny-model run on the alphabet corpus, on this mode's device."""
    return [
        "model=tiny",
        *text_data_args(corpus, run_dir.parent / f"{run_dir.name}-cache"),
        f"hydra.run.dir={run_dir}",
        f"train.device={DEVICE}",
        "train.eval_steps=4",
        "optimizer.warmup_steps=10",
        "train.progress=lines",
        *extra,
    ]


# train.py with deterministic kernels (exact resume on CUDA needs them: flash attention's
# backward and cuBLAS otherwise add in an order that changes from run to run), and, when
# GPU_SUITE_STOP_AT is set, a SIGTERM to itself during that step: the run stops there through
# the real stop path (checkpoint, status "interrupted", exit 128 + 15), at a step known in advance.
DETERMINISTIC_TRAIN = textwrap.dedent(
    """
    import os, runpy, signal, sys
    import torch

    torch.use_deterministic_algorithms(True)  # with CUBLAS_WORKSPACE_CONFIG from the test
    STOP_AT = int(os.environ.get("GPU_SUITE_STOP_AT", "0"))
    if STOP_AT:
        from minigpt import trainer

        original = trainer.Trainer._train_step

        def train_step(self):
            if self.state.step == STOP_AT - 1:  # the step that makes state.step == STOP_AT
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self)

        trainer.Trainer._train_step = train_step
    sys.argv[0] = {train!r}
    runpy.run_path({train!r}, run_name="__main__")
    """
)
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


class Background:
    """Subprocesses started together when the suite starts, so that its wall time is its
    longest run's, not the sum of them all (tiny models leave the GPU mostly idle)."""

    def __init__(self, root: Path, jobs: int) -> None:
        self.root = root
        self.threads_each = max(1, distributed.usable_cores() // jobs)
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="gpu-suite")
        self.futures: dict[str, Future[Any]] = {}
        self.live: set[subprocess.Popen[str]] = set()
        self.lock = threading.Lock()

    def start(self, name: str, job: Callable[[Background], Any]) -> None:
        self.futures[name] = self.pool.submit(job, self)

    def result(self, name: str) -> Any:
        if name not in self.futures:
            pytest.fail(f"the suite did not start the run {name!r}")
        return self.futures[name].result()

    def run(
        self, argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 400
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` with the test environment; killed at ``timeout`` or when the suite ends."""
        env = {"OMP_NUM_THREADS": str(self.threads_each), **(env or {})}
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=clean_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        with self.lock:
            self.live.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n[gpu suite] killed after {timeout} s"
        finally:
            with self.lock:
                self.live.discard(proc)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def train(self, run_dir: Path, args: list[str], env: dict[str, str] | None = None) -> Run:
        """``python train.py args`` into ``run_dir``."""
        done = self.run([sys.executable, str(ROOT / "train.py"), *args], self.root, env)
        return Run(run_dir, done.returncode, done.stdout, done.stderr)

    def train_deterministic(
        self, run_dir: Path, args: list[str], stop_at: int | None = None
    ) -> Run:
        """train.py with deterministic kernels, stopping itself at ``stop_at`` if given."""
        wrapper = self.root / "deterministic_train.py"
        with self.lock:
            if not wrapper.exists():
                wrapper.write_text(DETERMINISTIC_TRAIN.format(train=str(ROOT / "train.py")))
        env = {**DETERMINISTIC_ENV, **({"GPU_SUITE_STOP_AT": str(stop_at)} if stop_at else {})}
        done = self.run([sys.executable, str(wrapper), *args], self.root, env)
        return Run(run_dir, done.returncode, done.stdout, done.stderr)

    def close(self) -> None:
        """Stop what still runs (an interrupted suite must not leave trainings behind)."""
        for future in self.futures.values():
            future.cancel()
        with self.lock:
            for proc in list(self.live):
                proc.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- the jobs
BF16_STEPS = gpu_or_dry(300, 40)
FP16_STEPS = 300
COMPILED_STEPS = gpu_or_dry(100, 20)
RESUME_STEPS, RESUME_STOP = gpu_or_dry((120, 60), (80, 40))  # the stop: a log and eval step


def bf16_dtype() -> str:
    """train.dtype=auto on a GPU with native bf16 (what the auto test checks it picks); the
    dry run asks for bfloat16 itself (auto keeps float32 on CPUs without fast bf16)."""
    if ON_GPU and torch.cuda.get_device_capability()[0] >= 8:
        return "auto"
    return "bfloat16"


def bf16_job(bg: Background) -> Run:
    """A few hundred steps in bf16 autocast: the run most tests read."""
    run_dir = bg.root / "bf16"
    args = [
        f"train.dtype={bf16_dtype()}",
        f"train.max_steps={BF16_STEPS}",
        f"train.batch_size={gpu_or_dry(16, 4)}",
        f"train.eval_every={gpu_or_dry(100, 20)}",
        f"train.log_every={gpu_or_dry(10, 5)}",
    ]
    return bg.train(run_dir, train_args(bg.root / "corpus", run_dir, *args))


def fp16_job(bg: Background) -> Run:
    """A few hundred steps in fp16 autocast with the gradient scaler, every step logged."""
    run_dir = bg.root / "fp16"
    args = [
        "train.dtype=float16",
        f"train.max_steps={FP16_STEPS}",
        "train.batch_size=16",
        "train.eval_every=100",
        "train.log_every=1",
    ]
    return bg.train(run_dir, train_args(bg.root / "corpus", run_dir, *args))


def compiled_job(bg: Background) -> Run:
    """train.compile=true, with inductor's output in a folder of its own to look into."""
    run_dir = bg.root / "compiled"
    args = [
        "train.compile=true",
        f"train.dtype={gpu_or_dry('bfloat16', 'float32')}",  # CPU bf16 is too slow for the dry run
        f"train.max_steps={COMPILED_STEPS}",
        f"train.batch_size={gpu_or_dry(16, 4)}",
        f"train.eval_every={COMPILED_STEPS}",
        "train.log_every=5",
    ]
    env = {"TORCHINDUCTOR_CACHE_DIR": str(bg.root / "inductor")}
    return bg.train(run_dir, train_args(bg.root / "corpus", run_dir, *args), env)


def resume_args(bg: Background, run_dir: Path) -> list[str]:
    """The exact-resume runs: bf16 on the GPU (fp32 in the dry run: CPU bf16 is slow), dropout
    on (its masks come from the device's generator), a checkpoint every 50 steps."""
    args = [
        f"train.dtype={gpu_or_dry('bfloat16', 'float32')}",
        "model.dropout=0.1",
        f"train.max_steps={RESUME_STEPS}",
        "train.batch_size=8",
        "train.eval_every=40",
        "train.ckpt_every=50",
        "train.log_every=10",
    ]
    return train_args(bg.root / "corpus", run_dir, *args)


def resume_reference_job(bg: Background) -> Run:
    """The uninterrupted run, deterministic kernels."""
    run_dir = bg.root / "reference"
    return bg.train_deterministic(run_dir, resume_args(bg, run_dir))


def interrupted_job(bg: Background) -> tuple[Run, Run]:
    """The same run stopped by SIGTERM at step RESUME_STOP, then resumed (resume=auto)."""
    run_dir = bg.root / "interrupted"
    stopped = bg.train_deterministic(run_dir, resume_args(bg, run_dir), stop_at=RESUME_STOP)
    resumed = bg.train_deterministic(run_dir, resume_args(bg, run_dir))
    return stopped, resumed


# One rank and a real process group (NCCL on the GPU, gloo in the dry run): the Dist of one
# process is not distributed and joins no group, so the script joins one itself through
# minigpt.distributed and runs the package's collectives and DDP over it.
PROCESS_GROUP = textwrap.dedent(
    """
    import json, sys
    from dataclasses import asdict
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel
    import tempfile
    from pathlib import Path
    from torch.distributed.tensor import DTensor
    from minigpt import checkpoint, distributed
    from minigpt.config import OptimizerConfig
    from minigpt.distributed import Dist
    from minigpt.model import GPT, GPTConfig
    from minigpt.optim import build_optimizer
    from minigpt.parallel import Parallel

    device_kind, backend, out = sys.argv[1:4]
    torch.use_deterministic_algorithms(True)


    class OneRankGroup(Dist):
        @property
        def is_distributed(self):  # one rank, but a real group: the collectives do run
            return True


    def ddp_matches_plain(device):
        cfg = GPTConfig(n_layer=2, n_head=2, d_model=64, block_size=32, vocab_size=256)
        torch.manual_seed(0)
        plain = GPT(cfg).to(device)
        torch.manual_seed(0)
        inner = GPT(cfg).to(device)
        ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(inner, device_ids=ids)
        optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, inner)]
        tokens = torch.randint(0, 256, (3, 4, 33), generator=torch.Generator().manual_seed(1))
        for batch in tokens.to(device):
            for model, opt in zip((plain, wrapped), optimizers):
                _, loss = model(batch[:, :-1], batch[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad()
        pairs = zip(plain.state_dict().values(), inner.state_dict().values())
        return all(torch.equal(a, b) for a, b in pairs)


    def fsdp_facts(job):
        # train.parallel=fsdp's CUDA path on a one-rank mesh: the bf16 policy (bf16 compute,
        # fp32 master weights and gradients), a clipped step, and DCP shards saved and loaded
        # over NCCL, then consolidated on the host.
        cfg = GPTConfig(n_layer=2, n_head=2, d_model=64, block_size=32, vocab_size=256)
        torch.manual_seed(0)
        par = Parallel(GPT(cfg), "fsdp", job, torch.bfloat16)
        optimizer = build_optimizer(par.model, OptimizerConfig(lr=1e-3))
        seen = []
        linear = par.model.transformer.h[0].attn.c_attn
        hook = linear.register_forward_hook(lambda m, i, o: seen.append(str(o.dtype)))
        batch = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
        batch = batch.to(job.device)
        _, loss = par.model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        hook.remove()
        params = list(par.model.parameters())
        facts = {
            "sharded": par.sharded,
            "params": sorted({f"{type(p).__name__} {p.dtype}" for p in params}),
            "grads": sorted({str(p.grad.dtype) for p in params}),
            "compute": seen,
            "grad_norm_finite": bool(torch.isfinite(torch.tensor(par.clip_grad_norm(1.0)))),
        }
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "shards"
            par.save_shards(optimizer, folder)
            torch.manual_seed(1)  # another init: the load must replace it
            again = Parallel(GPT(cfg), "fsdp", job, torch.bfloat16)
            again_opt = build_optimizer(again.model, OptimizerConfig(lr=1e-3))
            again.load_shards(again_opt, folder)
            full = {n: p.full_tensor() for n, p in par.model.named_parameters()}
            loaded = {n: p.full_tensor() for n, p in again.model.named_parameters()}
            facts["reloaded_equal"] = all(torch.equal(full[n], loaded[n]) for n in full)
            order, aliases = par.param_order(optimizer), par.aliases()
            host = checkpoint.read_shards(folder, order, aliases)["model"]
            facts["consolidated_equal"] = all(
                torch.equal(host[n].to(job.device), full[n]) for n in full
            )
        facts["dtensor"] = all(isinstance(p, DTensor) for p in params)
        return facts


    found = distributed.setup(device_kind, backend, timeout_s=60)
    job = OneRankGroup(**{**asdict(found), "backend": backend})
    distributed._init_process_group(job, backend, job.device, 60)
    try:
        device = torch.device(job.device)
        group = tdist.distributed_c10d._get_default_group()
        pair = torch.tensor([1.5, 2.0], device=device)
        facts = {
            "device": job.device,
            "launcher": job.launcher,
            "current_device": torch.cuda.current_device() if device.type == "cuda" else None,
            "backend": tdist.get_backend(),
            "world_size": tdist.get_world_size(),
            "bound_device": str(getattr(group, "bound_device_id", "absent")),
            "sum": distributed.all_reduce_sum(pair, job).tolist(),
            "mean": distributed.all_reduce_mean(torch.tensor([3.0], device=device), job).tolist(),
            "max": distributed.all_reduce_max(torch.tensor([-1.0], device=device), job).tolist(),
            "broadcast": distributed.broadcast_object({"run_dir": "/runs/a"}, job),
            "gathered": distributed.gather_objects({"rank": job.rank}, job),
        }
        distributed.barrier(job)
        facts["ddp_matches_plain"] = ddp_matches_plain(device)
        facts["fsdp"] = fsdp_facts(job)
    finally:
        distributed.teardown(job)
    facts["initialized_after_teardown"] = tdist.is_initialized()
    with open(out, "w") as f:
        json.dump(facts, f)
    """
)


def process_group_job(bg: Background) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The one-rank process group script, as torchrun would start rank 0 of 1."""
    script, out = bg.root / "process_group.py", bg.root / "process_group.json"
    script.write_text(PROCESS_GROUP)
    env = {
        **DETERMINISTIC_ENV,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    backend = gpu_or_dry("nccl", "gloo")
    done = bg.run([sys.executable, str(script), DEVICE, backend, str(out)], bg.root, env, 120)
    return done, out


# Fixture name -> (job, whether it can run in the dry run). conftest.py starts the jobs of the
# fixtures the selected tests use.
JOBS: dict[str, tuple[Callable[[Background], Any], bool]] = {
    "bf16_run": (bf16_job, True),
    "fp16_run": (fp16_job, False),
    "compiled_run": (compiled_job, True),
    "resume_reference": (resume_reference_job, True),
    "interrupted_runs": (interrupted_job, True),
    "process_group": (process_group_job, True),
}
