"""Multi-node torchrun without Slurm: two `heft train --nnodes 2` launchers on this machine train to
the same losses as one launcher with the same total processes."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conftest import REFERENCE_RUNS, REPO, heft_env, read_metrics, run_heft


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_launchers_match_one(tmp_path, tiny_train_config, layout_runs):
    overrides = REFERENCE_RUNS["multinode/dp2_4_steps"]
    one = layout_runs["multinode/dp2_4_steps"]  # one launcher, two processes (trained once per session)

    endpoint = f"127.0.0.1:{free_port()}"
    two = tmp_path / "two"
    launchers = [
        subprocess.Popen([sys.executable, "-m", "heft.launcher.cli", "train", str(tiny_train_config),
                          *overrides, f"train.run_dir={two}", "--nnodes", "2", "--nproc-per-node", "1",
                          "--node-rank", str(node), "--rdzv-endpoint", endpoint, "--rdzv-id", "mn"],
                         cwd=REPO, env=heft_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, stdin=subprocess.DEVNULL)
        for node in (1, 0)  # node 1 first: the non-hosting launcher waits for node 0's store
    ]
    outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    for launcher, (out, err) in zip(launchers, outputs):
        assert launcher.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"

    one_losses = [r["loss"] for r in read_metrics(one)]
    two_losses = [r["loss"] for r in read_metrics(two)]
    assert len(two_losses) == 4
    assert two_losses == pytest.approx(one_losses, rel=1e-6, abs=1e-6)
    # Only node 0's launcher records the run for `heft status`.
    status = run_heft(["status", str(two)]).stdout
    assert "state  done" in status and "step  4 of 4" in status


def test_multi_node_flags_are_checked():
    bad = run_heft(["train", "configs/demo.yaml", "--nnodes", "2", "--nproc-per-node", "1"], check=False)
    assert bad.returncode == 2 and "--rdzv-endpoint" in bad.stderr
