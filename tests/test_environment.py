"""Worker detection and the torch.distributed environment implied by srun's variables."""

from __future__ import annotations

from heft.launcher.cli import build_parser, train_launch_arguments as torchrun_arguments
from heft.launcher.config import load_config
from heft.launcher.launch.environment import first_slurm_host, is_srun_task, is_torchrun_worker, torch_env_from_slurm


def test_torchrun_and_srun_detection():
    assert is_torchrun_worker({"TORCHELASTIC_RUN_ID": "x"})
    assert not is_torchrun_worker({"RANK": "0"})
    # Inside sbatch but outside srun there is no step id: that is not a worker yet.
    assert not is_srun_task({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"})
    assert is_srun_task({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"})


def test_slurm_variables_map_to_torch_distributed():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_LOCALID": "1",
           "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "gpu[003-004]"}
    assert torch_env_from_slurm(env) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu003", "MASTER_PORT": str(29500 + 234),
    }
    # Heterogeneous "4(x2)" forms and an explicit MASTER_ADDR.
    env.update(SLURM_NTASKS_PER_NODE="4(x2)", MASTER_ADDR="head")
    assert torch_env_from_slurm(env)["LOCAL_WORLD_SIZE"] == "4"
    assert torch_env_from_slurm(env)["MASTER_ADDR"] == "head"


def test_first_slurm_host_without_scontrol():
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("a[01-03,07],b2") == "a01"


def test_heft_train_builds_the_torchrun_command(tmp_path):
    cfg = load_config(None, ["parallel.tensor=2", "parallel.data=2"])
    args = build_parser().parse_args(["train", "c.yaml", "parallel.tensor=2", "parallel.data=2"])
    cmd = torchrun_arguments(args, cfg)
    assert cmd[:2] == ["--nproc-per-node=4", "--standalone"]
    assert cmd[-5:] == ["-m", "heft.launcher.worker", "c.yaml", "parallel.tensor=2", "parallel.data=2"]
    multi = build_parser().parse_args(["train", "c.yaml", "--nnodes", "2", "--nproc-per-node", "2",
                                       "--rdzv-endpoint", "h:29400", "--node-rank", "1"])
    cmd = torchrun_arguments(multi, cfg)
    assert "--node-rank=1" in cmd
    assert "--nnodes=2" in cmd and "--rdzv-endpoint=h:29400" in cmd and "--standalone" not in cmd
