"""Are we a worker, and if under srun, what torch.distributed environment does Slurm imply?

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and
TORCHELASTIC_RUN_ID). ``srun`` sets only Slurm's own variables; heft maps them so the same worker
code (and mosaicml-streaming, which reads the same names) runs under either launcher.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Mapping


def is_torchrun_worker(env: Mapping[str, str] = os.environ) -> bool:
    return "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def is_srun_task(env: Mapping[str, str] = os.environ) -> bool:
    """Inside a job step started by srun (not merely inside an sbatch script)."""
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist such as ``gpu[003-005,009],cpu1``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    if not match:
        raise ValueError(f"cannot parse Slurm nodelist {nodelist!r}")
    return match.group(1) + (match.group(2) or "")


def torch_env_from_slurm(env: Mapping[str, str], default_port: int = 29500) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_*/MASTER_* implied by an srun task's Slurm variables."""
    ntasks = int(env["SLURM_NTASKS"])
    nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    local_world = env.get("SLURM_NTASKS_PER_NODE") or str(ntasks // max(nnodes, 1))
    job_id = int(env.get("SLURM_JOB_ID", "0"))
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": re.match(r"\d+", local_world).group(0),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost")),
        # Derive the port from the job id so two jobs sharing a node do not collide.
        "MASTER_PORT": env.get("MASTER_PORT") or str(default_port + job_id % 1000),
    }


def prepare_worker_environment() -> bool:
    """Make os.environ a torch.distributed worker environment. False if this is no worker."""
    if is_torchrun_worker():
        return True
    if is_srun_task():
        os.environ.update(torch_env_from_slurm(os.environ))
        return True
    return False
