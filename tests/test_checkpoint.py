"""Checkpoint and resume through the `heft` CLI with real torchrun workers on gloo: exact resume,
resharding onto other layouts, kill -9, preemption signals, damaged and foreign checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (CHECKPOINT_REWEIGHT as REWEIGHT, FUSED_AND_OVERLAPPED, TP2_PP2, heft_env, read_metrics,
                      run_heft, wait_for_step, worker_with_rank)

HEFT = str(Path(sys.executable).parent / "heft")
RTOL = 1e-5


def _train(config, run_dir, steps, *overrides, check=True):
    return run_heft(["train", str(config), f"train.run_dir={run_dir}", f"train.steps={steps}",
                     "checkpoint.interval=3", *REWEIGHT, *overrides], check=check)


def _losses(run_dir) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)}


def _assert_same_steps(got: dict, ref: dict, steps, rel=0.0):
    for step in steps:
        assert got[step][0] == pytest.approx(ref[step][0], rel=rel, abs=0), f"step {step} loss"
        assert got[step][1] == pytest.approx(ref[step][1], rel=max(rel, 1e-12)), f"step {step} grad norm"


@pytest.fixture(scope="module")
def tp2_pp2_straight(layout_runs):
    """The uninterrupted reference: 6 steps under TP2 x PP2, checkpoints at steps 3 and 6
    (conftest.REFERENCE_RUNS, trained once per session)."""
    return layout_runs["checkpoint/tp2_pp2"]


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_run(tiny_train_config, tmp_path, tp2_pp2_straight):
    """Stopped at step 3 of 6 under TP2 x PP2 (global reweighting), the same command resumes."""
    resumed = tmp_path / "resumed"
    first = _train(tiny_train_config, resumed, 6, *TP2_PP2, "train.stop_at_step=3")
    assert "stopped at step 3 of 6" in first.stdout
    proc = _train(tiny_train_config, resumed, 6, *TP2_PP2)  # the same command: resumes
    assert f"resuming from {resumed / 'checkpoints' / 'step_3'}" in proc.stdout
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4, 5, 6]  # no duplicates
    # fp32 on CPU: bitwise equal losses and gradient norms at every step after the resume, so the
    # weights, optimizer moments, LR, data position and lagged statistics were all restored.
    _assert_same_steps(_losses(resumed), _losses(tp2_pp2_straight), range(1, 7))
    state = json.loads((resumed / "checkpoints" / "step_6" / "heft" / "state.json").read_text())
    assert state["step"] == 6 and state["consumed_samples"] == 48


@pytest.mark.slow
def test_interleaved_pipeline_with_microbatch_reweighting_continues_bitwise(tiny_train_config, tmp_path, layout_runs):
    """PP2 x VPP2 x DP2 with per-microbatch reweighting: its uninterrupted run's step-3 checkpoint,
    continued by a new run (``checkpoint.load``), gives that run's steps 4-6 bitwise."""
    layout = ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.data=2", "reweight.scope=microbatch"]
    straight = layout_runs["checkpoint/pp2_vpp2_dp2_microbatch"]
    run_dir = tmp_path / "continued"
    proc = _train(tiny_train_config, run_dir, 6, *layout, f"checkpoint.load={straight / 'checkpoints' / 'step_3'}")
    assert f"resuming from {straight / 'checkpoints' / 'step_3'}" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [4, 5, 6]
    _assert_same_steps(_losses(run_dir), _losses(straight), range(4, 7))
    state = json.loads((run_dir / "checkpoints" / "step_6" / "heft" / "state.json").read_text())
    assert state["step"] == 6 and state["consumed_samples"] == 48


@pytest.mark.slow
@pytest.mark.parametrize("name, layout", [
    ("dp4_distributed_optimizer", ["parallel.data=4", "parallel.distributed_optimizer=true"]),
    ("single_process", ["parallel.data=1"]),
])
def test_checkpoint_reshards_onto_another_layout(name, layout, tiny_train_config, tmp_path, tp2_pp2_straight):
    """A TP2 x PP2 checkpoint continued under another layout gives the losses of continuing under
    TP2 x PP2. Step 5 and 6 depend on the Adam moments, so the optimizer state resharded too."""
    source = tp2_pp2_straight / "checkpoints" / "step_3"
    run_dir = tmp_path / name
    proc = _train(tiny_train_config, run_dir, 6, *layout, f"checkpoint.load={source}")
    assert f"resuming from {source}" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [4, 5, 6]
    _assert_same_steps(_losses(run_dir), _losses(tp2_pp2_straight), range(4, 7), rel=RTOL)


@pytest.mark.slow
def test_distributed_optimizer_checkpoint_back_onto_the_plain_optimizer(tiny_train_config, tmp_path, tp2_pp2_straight):
    """TP2 x PP2 (plain) -> DP4 with the distributed optimizer for one step -> TP2 x PP2 (plain)."""
    middle = tmp_path / "dp4"
    _train(tiny_train_config, middle, 6, "parallel.data=4", "parallel.distributed_optimizer=true",
           "train.stop_at_step=4", f"checkpoint.load={tp2_pp2_straight / 'checkpoints' / 'step_3'}")
    back = tmp_path / "back"
    _train(tiny_train_config, back, 6, *TP2_PP2, f"checkpoint.load={middle / 'checkpoints' / 'step_4'}")
    _assert_same_steps(_losses(back), _losses(tp2_pp2_straight), range(5, 7), rel=RTOL)


@pytest.mark.slow
def test_fused_adam_and_overlapped_weight_gather_resume_exactly(tiny_train_config, tmp_path, tp2_pp2_straight,
                                                               layout_runs):
    """What CUDA runs by default, on CPU: torch's fused AdamW, and the distributed optimizer's
    weight all-gather overlapped with the next forward pass."""
    from heft.launcher.checkpoint.export_hf import read_weights

    fast = FUSED_AND_OVERLAPPED
    straight = layout_runs["checkpoint/fused_overlapped"]
    # The same training as the foreach TP2 x PP2 reference (to the layout-invariance tolerance):
    # an overlapped gather that left a rank's weights stale would break this from step 2 on.
    _assert_same_steps(_losses(straight), _losses(tp2_pp2_straight), range(1, 7), rel=RTOL)
    resumed = tmp_path / "resumed"
    _train(tiny_train_config, resumed, 6, *fast, f"checkpoint.load={straight / 'checkpoints' / 'step_3'}")
    _assert_same_steps(_losses(resumed), _losses(straight), range(4, 7))  # bitwise
    # A checkpoint written right after an update holds the gathered weights: the same as those of
    # a run whose optimizer step gathered them itself.
    gathered_at_step = layout_runs["checkpoint/fused_gathered_at_step_3"]  # overlap off, stopped at step 3
    saved = dict(read_weights(straight / "checkpoints" / "step_3"))
    reference = dict(read_weights(gathered_at_step / "checkpoints" / "step_3"))
    assert saved.keys() == reference.keys()
    for key in saved:
        assert torch.equal(saved[key], reference[key]), key


@pytest.fixture(scope="module")
def dp2_straight(layout_runs):
    """The uninterrupted reference of the fault tests: 40 steps under DP2, saved at the end only."""
    return layout_runs["checkpoint/dp2_40_steps"]


@pytest.mark.slow
def test_kill_9_of_a_worker_then_the_same_command_finishes_equal(tiny_train_config, tmp_path, dp2_straight):
    # Asynchronous saves: the kill may land while a background process is still writing.
    layout = ["parallel.data=2", "checkpoint.async_save=true"]
    run_dir = tmp_path / "killed"
    command = [HEFT, "train", str(tiny_train_config), f"train.run_dir={run_dir}", "train.steps=40",
               "checkpoint.interval=3", *REWEIGHT, *layout]
    proc = subprocess.Popen(command, cwd=tmp_path, env=heft_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    kill_at = random.Random().randint(4, 9)
    wait_for_step(proc, run_dir, kill_at)
    while not (run_dir / "checkpoints" / "latest").exists():  # an async save may still be in flight
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    victim = worker_with_rank(proc.pid, rank=random.Random().randint(0, 1))
    victim.kill()  # SIGKILL
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "was killed by SIGKILL" in err, err[-2000:]
    again = subprocess.run(command, cwd=tmp_path, env=heft_env(), capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 41)), f"killed at step {kill_at}"
    assert not list((run_dir / "checkpoints").glob("*.partial"))
    _assert_same_steps(_losses(run_dir), _losses(dp2_straight), range(1, 41))


@pytest.mark.slow
def test_kill_9_of_the_launcher_makes_its_workers_save_and_end_then_the_same_command_resumes(tiny_train_config, tmp_path,
                                                                                           record_property):
    """The workers of a SIGKILLed `heft train` trained on alone, into a directory a rerun then
    shared (issue 22, item 2): now they save, end within seconds, and the same command resumes."""
    import psutil

    run_dir = tmp_path / "orphaned"
    command = [HEFT, "train", str(tiny_train_config), f"train.run_dir={run_dir}", "train.steps=100000",
               "checkpoint.interval=0", "parallel.data=2"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=heft_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    wait_for_step(proc, run_dir, 2)
    workers = [worker_with_rank(proc.pid, rank) for rank in (0, 1)]
    proc.kill()  # the launcher, not a worker
    killed = time.monotonic()
    _, alive = psutil.wait_procs(workers, timeout=60)
    ended_after = time.monotonic() - killed
    for worker in alive:
        worker.kill()
    _, err = proc.communicate(timeout=60)
    record_property("ended_after_s", round(ended_after, 2))  # docs/testing.md: the measured spread
    assert not alive and ended_after < 20, (ended_after, err[-3000:])
    assert "is gone; saving and stopping" in err, err[-3000:]
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert saved >= 2 and not (run_dir / "heft.lock").exists()
    again = subprocess.run([*command, f"train.stop_at_step={saved + 2}"], cwd=tmp_path, env=heft_env(),
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / f'step_{saved}'}" in again.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, saved + 3))


@pytest.mark.slow
def test_sigusr1_on_one_rank_saves_and_exits_75_then_resumes_equal(tiny_train_config, tmp_path, dp2_straight,
                                                                  record_property):
    layout = ["parallel.data=2", "checkpoint.interval=0"]
    run_dir = tmp_path / "preempted"
    command = [HEFT, "train", str(tiny_train_config), f"train.run_dir={run_dir}", "train.steps=40",
               *REWEIGHT, *layout]
    proc = subprocess.Popen(command, cwd=tmp_path, env=heft_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    wait_for_step(proc, run_dir, 3)
    worker_with_rank(proc.pid, rank=1).send_signal(signal.SIGUSR1)  # only rank 1 gets it
    signalled_after = max(r["step"] for r in read_metrics(run_dir))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert err.strip() == "", err
    saved = [line for line in out.splitlines() if "SIGUSR1 received: saved" in line]
    assert len(saved) == 1, out
    step = int(saved[0].split(" at step ")[1].split(";")[0])
    record_property("steps_after_signal", step - signalled_after)  # docs/testing.md: the measured spread
    assert signalled_after <= step <= signalled_after + 2  # at the next step boundary
    assert (run_dir / "checkpoints" / f"step_{step}" / "heft" / "state.json").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step}"
    again = subprocess.run(command, cwd=tmp_path, env=heft_env(), capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_same_steps(_losses(run_dir), _losses(dp2_straight), range(1, 41))


def test_sigterm_to_heft_train_is_forwarded_and_saves(tiny_train_config, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([HEFT, "train", str(tiny_train_config), f"train.run_dir={run_dir}",
                             "train.steps=100000", "parallel.data=2", "checkpoint.interval=0"],
                            cwd=tmp_path, env=heft_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    wait_for_step(proc, run_dir, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "SIGTERM received: saved" in out
    assert (run_dir / "checkpoints" / "latest").is_file()



def test_a_stop_request_at_the_last_step_finishes_the_run(tiny_train_config, tmp_path):
    """The run saves its last step anyway: it ends as finished (status 0), not asking for a requeue
    that would only start a job with nothing to do (a Slurm time limit can signal that late)."""
    import psutil

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([HEFT, "train", str(tiny_train_config), f"train.run_dir={run_dir}", "train.steps=1"],
                            cwd=tmp_path, env=heft_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:  # signalled while it starts up, once it catches the signal: honoured after step 1
        try:
            worker = worker_with_rank(proc.pid, rank=0)
            caught = int(Path(f"/proc/{worker.pid}/status").read_text().split("SigCgt:")[1].split()[0], 16)
            if caught >> (signal.SIGUSR1 - 1) & 1:
                worker.send_signal(signal.SIGUSR1)
                break
        except (AssertionError, psutil.Error, OSError):
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "no worker started"
        time.sleep(0.1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGUSR1 received at step 1, where this run ends anyway; not asking for a requeue" in out, out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_1"

@pytest.mark.parametrize("async_save", ["false", "true"])
def test_a_failed_save_is_one_line_and_leaves_nothing_stale(async_save, tiny_train_config, tmp_path):
    """A save that hit a file-size limit: a 30-line traceback, 'exited without reporting an error',
    heft-run.json stuck at running (issue 22, item 9). Now one line, state failed, nothing left over."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, resource.RLIM_INFINITY))

    run_dir = tmp_path / "run"
    proc = subprocess.run([HEFT, "train", str(tiny_train_config), f"train.run_dir={run_dir}", "train.steps=6",
                           "checkpoint.interval=3", "parallel.data=2", f"checkpoint.async_save={async_save}"],
                          cwd=tmp_path, env=heft_env(), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, preexec_fn=small_files)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"heft: failed: saving the checkpoint of step 3 to {run_dir / 'checkpoints'}")
    assert "file size limit (ulimit -f) 204800 bytes" in lines[0]
    state = json.loads((run_dir / "heft-run.json").read_text())
    assert state["state"] == "failed" and state["error"] == lines[0]
    assert not [p.name for p in run_dir.rglob("*") if p.name.endswith((".partial", ".tmp")) or p.name == "heft.lock"]


# --- damaged, foreign and refused checkpoints -----------------------------------------------------

CHAIN = ["parallel.data=2", "checkpoint.interval=1", "checkpoint.keep=5"]


@pytest.fixture(scope="module")
def five_checkpoints(layout_runs):
    """A finished 6-step DP2 run holding step_2 ... step_6 (step_1 was pruned); tests that change
    it work on a copy."""
    return layout_runs["checkpoint/dp2_five_checkpoints"]


def _truncate_a_shard(step_dir: Path) -> tuple[Path, str]:
    shard = sorted(step_dir.glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(100)
    return shard, "is truncated"


def _zero_tensor_bytes(step_dir: Path) -> tuple[Path, str]:
    victim = max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size // 2)
        f.write(bytes(4096))
    return victim, "does not match the checksum recorded when it was saved"


def _garbage_metadata(step_dir: Path) -> tuple[Path, str]:
    (step_dir / "metadata.json").write_text("{not json")
    return step_dir / "metadata.json", "is corrupt"


def _zero_common_pt(step_dir: Path) -> tuple[Path, str]:
    victim = step_dir / "common.pt"
    victim.write_bytes(bytes(victim.stat().st_size))
    return victim, "is damaged"


def test_each_kind_of_damage_falls_back_to_the_checkpoint_before(five_checkpoints, tiny_train_config, tmp_path):
    """Four kinds of damage, one per checkpoint (step_6 ... step_3): a truncated shard; zeroed bytes
    inside a tensor file of the same size, which loaded silently and trained on, and a garbage
    metadata.json or common.pt, which ended in a traceback (issue 22, item 4; the checksums recorded
    at save catch the zeroed bytes). export-hf refuses each naming the file; one resume warns about
    each in turn and starts from step_2, and steps 3-6 equal the undamaged run's."""
    run_dir = tmp_path / "run"
    shutil.copytree(five_checkpoints, run_dir)
    damaged = {}
    for step, damage in ((6, _truncate_a_shard), (5, _zero_tensor_bytes), (4, _garbage_metadata), (3, _zero_common_pt)):
        step_dir = run_dir / "checkpoints" / f"step_{step}"
        damaged[step_dir] = damage(step_dir)
    for step_dir, (victim, needle) in damaged.items():
        exported = run_heft(["export-hf", str(step_dir), str(tmp_path / f"hf-{step_dir.name}")], check=False)
        assert exported.returncode == 2 and needle in exported.stderr and str(victim) in exported.stderr, exported.stderr
    proc = _train(tiny_train_config, run_dir, 6, *CHAIN)
    for step_dir, (victim, needle) in damaged.items():
        warning = next((line for line in proc.stderr.splitlines()
                        if line.startswith(f"heft: warning: skipping checkpoint {step_dir}: {victim}")), "")
        assert needle in warning, (step_dir, proc.stderr)
    assert f"resuming from {run_dir / 'checkpoints' / 'step_2'}" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 7))
    _assert_same_steps(_losses(run_dir), _losses(five_checkpoints), range(3, 7))


def test_checkpoint_of_another_model_is_refused_naming_the_difference(five_checkpoints, tiny_train_config, tmp_path):
    proc = _train(tiny_train_config, tmp_path / "other", 8, "parallel.data=2", "model.hidden_size=128",
                  f"checkpoint.load={five_checkpoints / 'checkpoints' / 'step_6'}", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds another model: hidden_size 64 (checkpoint) vs 128 (this run)" in lines[0], proc.stderr


def test_a_pruned_or_mistyped_checkpoint_is_said_not_to_exist(five_checkpoints, tiny_train_config, tmp_path):
    """The README's block named a checkpoint keep=3 had pruned: 'state.json is missing' (issue 22, item 12)."""
    gone = five_checkpoints / "checkpoints" / "step_1"
    proc = _train(tiny_train_config, tmp_path / "other", 8, "parallel.data=2", f"checkpoint.load={gone}", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{gone} does not exist (pruned?" in proc.stderr and "holds step_2, step_3, step_4, step_5, step_6" in proc.stderr
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())


def test_load_none_with_existing_checkpoints_is_refused(five_checkpoints, tiny_train_config, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(five_checkpoints, run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = _train(tiny_train_config, run_dir, 8, "parallel.data=2", "checkpoint.load=none", check=False)
    assert proc.returncode == 2 and "checkpoint.load=none would overwrite them" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_a_finished_run_says_so_and_trains_nothing(five_checkpoints, tiny_train_config, tmp_path):
    proc = _train(tiny_train_config, five_checkpoints, 6, "parallel.data=2")
    assert "already reached step 6 of train.steps=6" in proc.stdout and "nothing to do" in proc.stdout


def test_tensorboard_continues_without_duplicated_steps(tiny_train_config, tmp_path, layout_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    shutil.copytree(layout_runs["checkpoint/dp2_tensorboard_5_steps"], run_dir)  # 5 steps, saved at 3 and 5
    # As if killed after logging step 5 but before saving it: the newest checkpoint is step_3, and
    # metrics.jsonl and TensorBoard already hold steps 4 and 5.
    shutil.rmtree(run_dir / "checkpoints" / "step_5")
    proc = _train(tiny_train_config, run_dir, 6, "parallel.data=2", "train.tensorboard=true")
    assert "resuming from" in proc.stdout and "step_3" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]


# --- the on-disk protocol --------------------------------------------------------------------------

def test_metadata_with_a_foreign_class_is_refused_without_unpickling(tmp_path):
    from heft.launcher.checkpoint import files

    ckpt = tmp_path / "step_1"
    (ckpt / "heft").mkdir(parents=True)
    (ckpt / "heft" / "state.json").write_text(json.dumps({"step": 1}))
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(files.CheckpointError, match="posix.system is not allowed|os.system is not allowed"):
        files.verify(ckpt)
    assert not marker.exists()


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_partial_checkpoints_are_never_chosen_and_pruning_keeps_the_newest(tmp_path):
    from heft.launcher.checkpoint import files

    ckpt_dir = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        partial = files.partial_dir(ckpt_dir, step)
        (partial / "heft").mkdir(parents=True)
        (partial / "heft" / "state.json").write_text("{}")
        files.commit(ckpt_dir, step, keep=2)
    files.partial_dir(ckpt_dir, 8).mkdir()  # a save that was killed
    (ckpt_dir / "notes.partial").mkdir()  # not heft's: never touched
    assert [p.name for p in files.complete_checkpoints(ckpt_dir)] == ["step_4", "step_6"]
    assert (ckpt_dir / "latest").read_text().strip() == "step_6"
    files.remove_stale_partials(ckpt_dir)
    assert not files.partial_dir(ckpt_dir, 8).exists() and (ckpt_dir / "notes.partial").exists()
    # A save at a lower step (after falling back past a broken newer one) never prunes itself.
    (files.partial_dir(ckpt_dir, 5) / "heft").mkdir(parents=True)
    (files.partial_dir(ckpt_dir, 5) / "heft" / "state.json").write_text("{}")
    files.commit(ckpt_dir, 5, keep=1)
    assert [p.name for p in files.complete_checkpoints(ckpt_dir)] == ["step_5", "step_6"]


def test_rolling_back_in_place_is_refused(five_checkpoints, tiny_train_config, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(five_checkpoints, run_dir)
    proc = _train(tiny_train_config, run_dir, 6, "parallel.data=2",
                  f"checkpoint.load={run_dir / 'checkpoints' / 'step_3'}", check=False)
    assert proc.returncode == 2 and "already holds step_6; start from it in a new train.run_dir" in proc.stderr
