"""hydra-submitit-launcher's ``submitit_slurm``, extended in place for minigpt.

The same keys as the upstream launcher, plus:

- ``srun_args``: extra ``srun`` arguments (the presets pass ``--kill-on-bad-exit=1`` so that one
  failing rank ends the job at once instead of leaving the others waiting for the time limit);
- ``wait``: ``false`` submits the sweep and returns at once, printing the job ids and the sweep
  folder (upstream blocks the login shell until every job has ended);
- ``dry_run``: ``true`` prints, for every sweep point, what would be submitted, and submits nothing;
- waiting (``wait: true``), a job that left no result (killed, out of requeues, lost) is a FAILED
  result of its own, as under Hydra's basic launcher, instead of an exception that loses the
  other jobs' results (the Bayesian search of ``hydra_plugins/minigpt_search`` tells them all).

Registered under the upstream name, so ``hydra/launcher=submitit_slurm`` and the ``cluster=``
presets both get it; the rest of what upstream does (the executor, the job function, requeue
through ``checkpoint``) is inherited unchanged.

No ``from __future__ import annotations`` here: Hydra's plugin scan executes this module outside
``sys.modules``, where dataclasses cannot resolve string annotations.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)

SUBMITTED_FILE = "submitted.json"


@dataclass
class MinigptSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.minigpt_slurm.launcher.MinigptSlurmLauncher"
    srun_args: list[str] = field(default_factory=lambda: ["--kill-on-bad-exit=1"])
    wait: bool = True
    dry_run: bool = False


class MinigptSlurmLauncher(SlurmLauncher):
    """SlurmLauncher with submit-and-return, a dry run and srun arguments."""

    def __init__(self, **params: Any) -> None:
        self.wait = bool(params.pop("wait", True))
        self.dry_run = bool(params.pop("dry_run", False))
        super().__init__(**params)

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict[type, Singleton],
    ) -> JobReturn:
        """Runs in every task of the job; ranks other than 0 write no Hydra files or log file."""
        from minigpt import distributed

        if distributed.detect().rank != 0:
            sweep_overrides = [*sweep_overrides, "hydra.output_subdir=null"]
            sweep_overrides.append("hydra/job_logging=stdout")
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        if self.dry_run:
            return self._dry_run(job_overrides, initial_job_idx)
        if self.wait:
            return self._submit_and_wait(job_overrides, initial_job_idx)
        return self._submit_and_return(job_overrides, initial_job_idx)

    # ------------------------------------------------------------------ dry run
    def _dry_run(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> list[JobReturn]:
        from minigpt.config import to_object
        from minigpt.plan import fit_warning, plan_memory, plan_run

        assert self.config is not None and self.hydra_context is not None
        p = self.params
        world_size = int(p["nodes"]) * int(p["tasks_per_node"])
        resources = _resources(p)
        print(f"dry run: {len(job_overrides)} job(s) would be submitted, nothing was.")
        print(f"  each job: {resources}")
        print(f"  sweep folder: {self.config.hydra.sweep.dir} (a dry run leaves none)")
        returns = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(sweep_config):
                del sweep_config["hydra"]
            cfg = to_object(sweep_config)
            plan = plan_run(cfg, world_size)
            print(f"  #{idx} {' '.join(filter_overrides(overrides)) or '(defaults)'}")
            print(f"      {plan.describe()}")
            memory = {p: plan_memory(cfg, world_size, p) for p in ("ddp", "fsdp")}
            chosen = cfg.train.parallel
            print("      memory per GPU, " + "; ".join(m.describe() for m in memory.values()))
            warning = fit_warning(memory[chosen], cfg.cluster.gpu_memory_gb)
            if warning:
                print(f"      WARNING: train.parallel={chosen} {warning}")
            returns.append(_done(overrides))
        return returns

    # ------------------------------------------------------------------ submit
    def _submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        """Upstream ``launch`` up to the submission: one array job, its submitit jobs."""
        import submitit

        assert self.config is not None
        executor = self._executor(submitit)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        job_params = []
        for num, o in enumerate(job_overrides, start=initial_job_idx):
            job_params.append(
                (list(o), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state())
            )
        return list(executor.map_array(self, *zip(*job_params, strict=True)))

    def _submit_and_wait(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> list[JobReturn]:
        """Upstream ``launch``, except that a job that left no result (killed, out of requeues,
        lost) is a FAILED result of its own, as under Hydra's basic launcher: upstream raises at
        the first such job and the other jobs' results are lost, which a search needs to tell."""
        assert self.config is not None
        log.info(f"Submitit 'slurm' sweep output dir : {self.config.hydra.sweep.dir}")
        for i, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(overrides))}")
        jobs = self._submit(job_overrides, initial_job_idx)
        returns = []
        for job, overrides in zip(jobs, job_overrides, strict=True):
            try:
                returns.append(job.results()[0])
            except Exception as err:  # submitit's FailedJobError, UncompletedJobError
                returns.append(
                    JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=err)
                )
        return returns

    # ------------------------------------------------------------------ submit and return
    def _submit_and_return(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> list[JobReturn]:
        """Submits the jobs, then records them instead of waiting."""
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        jobs = self._submit(job_overrides, initial_job_idx)
        records = [
            {"job": initial_job_idx + i, "job_id": j.job_id, "overrides": list(o)}
            for i, (j, o) in enumerate(zip(jobs, job_overrides, strict=True))
        ]
        _append_records(sweep_dir / SUBMITTED_FILE, records)
        print(f"submitted {len(jobs)} job(s) to SLURM, not waiting for them:")
        for rec in records:
            overrides = " ".join(filter_overrides(rec["overrides"]))
            print(f"  #{rec['job']} job {rec['job_id']}: {overrides}")
        print(f"sweep folder: {sweep_dir}")
        print(f"follow with: squeue -j {','.join(str(j.job_id).split('_')[0] for j in jobs[:1])}")
        print(f"report when done: python -m minigpt.report {sweep_dir}")
        return [_done(o) for o in job_overrides]

    def _executor(self, submitit: Any) -> Any:
        """The executor upstream's ``launch`` builds, with the same parameters."""
        params = dict(self.params)
        init = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init["slurm_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster="slurm", **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"slurm_{k}": v for k, v in params.items()}
        )
        return executor


def _resources(p: dict[str, Any]) -> str:
    keys = (
        "partition", "account", "qos", "nodes", "tasks_per_node", "gpus_per_node",
        "cpus_per_task", "mem_gb", "timeout_min", "max_num_timeout", "srun_args",
    )  # fmt: skip
    shown = [f"{k}={p[k]}" for k in keys if p.get(k) not in (None, [], {})]
    if p.get("setup"):
        shown.append(f"setup={p['setup']}")
    if p.get("additional_parameters"):
        shown.append(f"additional_parameters={p['additional_parameters']}")
    return ", ".join(shown)


def _done(overrides: Sequence[str]) -> JobReturn:
    return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=None)


def _append_records(path: Path, records: list[dict[str, Any]]) -> None:
    old = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(old + records, indent=2) + "\n")


def _register() -> None:
    ConfigStore.instance().store(
        group="hydra/launcher",
        name="submitit_slurm",
        node=MinigptSlurmQueueConf(),
        provider="minigpt",
    )


class MinigptSlurmRegistration(SearchPathPlugin):
    """Puts this launcher's config under upstream's name once all plugins have been scanned.

    Hydra's plugin scan executes every plugin module, upstream's config included, in an order that
    depends on sys.path; a registration at import time could be overwritten. Hydra calls search-path
    plugins after the scan and before composing the config, so registering here always wins.
    """

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        _register()


_register()
