"""What a new user meets around a run: install namespace, one-line errors before launch, no hangs,
no silent damage, Ctrl-C. Every run here is the real `heft` CLI launching real torchrun workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import heft_env, holders_of, read_metrics, wait_for_step, worker_with_rank

HEFT = str(Path(sys.executable).parent / "heft")


def _heft(args, cwd, timeout=300):
    return subprocess.run([HEFT, *args], cwd=cwd, env=heft_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _one_error_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("heft: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- namespace -------------------------------------------------------------------------------------

def test_trains_from_a_directory_with_data_model_launcher_modules(tiny_train_config, tmp_path):
    project = tmp_path / "my_project"
    project.mkdir()
    for name in ("data.py", "model.py", "launcher.py", "reweighting.py"):
        (project / name).write_text("raise ImportError('a user file, not heft')\n")
    proc = _heft(["train", str(tiny_train_config), "train.run_dir=run", "parallel.data=2",
                  "train.steps=2"], cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(project / "run")] == [1, 2]


def test_installed_distribution_has_only_the_heft_namespace(heft_wheel):
    shown = subprocess.run([sys.executable, "-m", "pip", "show", "-f", "heft"], capture_output=True,
                           text=True, check=True).stdout
    files = [line.strip() for line in shown.split("Files:")[1].splitlines() if line.strip()]
    assert not [f for f in files if f.split("/")[0] in ("data", "model", "launcher", "reweighting")]
    # A regular (non-editable) wheel: everything under heft/ or its metadata.
    names = zipfile.ZipFile(heft_wheel).namelist()
    assert "heft/launcher/cli.py" in names and "heft/data/loader.py" in names
    assert all(n.startswith(("heft/", "heft-")) for n in names), names


# --- errors before launch, in one line -----------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("optim.beta1=2", "optim.beta1 must be in [0, 1)"),
    ("optim.clip_grad=-1", "optim.clip_grad must be >= 0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.eps=-1e-8", "optim.eps must be > 0"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s must be > 0"),
    ("parallel.tensor=3", "not divisible by parallel.tensor=3"),
])
def test_bad_fields_fail_before_launch(tiny_train_config, tmp_path, override, needle):
    _one_error_line(_heft(["train", str(tiny_train_config), f"train.run_dir={tmp_path / 'r'}", override],
                          cwd=tmp_path), needle)
    assert not (tmp_path / "r").exists()


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  preset: tiny\ntrain: {steps: 3\noptim: {lr: 1}\n")
    line = _one_error_line(_heft(["train", str(config)], cwd=tmp_path), f"{config}:4:", "YAML syntax error")
    assert "Traceback" not in line


@pytest.fixture
def corpus_copy(small_corpus, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(small_corpus, copy)
    return copy


def _train_on(config, data, tmp_path, *overrides):
    return _heft(["train", str(config), f"data.path={data}", f"train.run_dir={tmp_path / 'run'}",
                  *overrides], cwd=tmp_path)


def test_corrupt_manifest_names_the_file(tiny_train_config, corpus_copy, tmp_path):
    (corpus_copy / "manifest.json").write_text('{"format": "heft-prepared/1", "domains": [')
    _one_error_line(_train_on(tiny_train_config, corpus_copy, tmp_path), "manifest.json is corrupt",
                    "re-run heft prepare")


def test_truncated_and_missing_shards_name_domain_and_file(tiny_train_config, corpus_copy, tmp_path):
    shard = next((corpus_copy / "docs" / "train").glob("shard.*.mds"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    _one_error_line(_train_on(tiny_train_config, corpus_copy, tmp_path), "domain 'docs'", str(shard),
                    "truncated or replaced")
    shard.unlink()
    _one_error_line(_train_on(tiny_train_config, corpus_copy, tmp_path), "domain 'docs'",
                    f"{shard} is missing")


def test_too_little_data_for_one_step_fails_before_launch(tiny_train_config, tmp_path):
    from heft.data.prepare import prepare

    data = tmp_path / "tiny_data"
    prepare({"code": ["x" * 1000], "docs": ["y" * 700]}, data, tokenizer="byte", seq_length=64)
    start = time.monotonic()
    line = _one_error_line(
        _train_on(tiny_train_config, data, tmp_path, "data.proportions=null", "train.global_batch_size=32"),
        "training samples in the mixture", "train.global_batch_size=32")
    assert "code 15" in line and time.monotonic() - start < 60  # one document each: none held out


def test_unwritable_run_dir_fails_before_launch(tiny_train_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _one_error_line(_heft(["train", str(tiny_train_config), f"train.run_dir={blocker / 'run'}"], cwd=tmp_path),
                    "is not writable")


def test_reusing_a_run_dir_without_checkpoint_is_refused(tiny_train_config, tmp_path):
    run_dir = tmp_path / "run"
    base = ["train", str(tiny_train_config), f"train.run_dir={run_dir}", "train.steps=2"]
    assert _heft(base, cwd=tmp_path).returncode == 0
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a run that never saved one
    before = (run_dir / "metrics.jsonl").read_text()
    _one_error_line(_heft(base, cwd=tmp_path), "already holds a run", "no checkpoint to resume from")
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing appended


# --- no hangs, no silent damage --------------------------------------------------------------------

@pytest.mark.slow
def test_a_stopped_rank_becomes_an_error_naming_it(tiny_train_config, tmp_path, record_property):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [HEFT, "train", str(tiny_train_config), f"train.run_dir={run_dir}", "parallel.data=2",
         "train.steps=100000", "train.step_timeout_s=8", "train.collective_timeout_s=30"],
        cwd=tmp_path, env=heft_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL)
    stopped = None
    try:
        wait_for_step(proc, run_dir, 2)
        stopped = worker_with_rank(proc.pid, 1)
        stopped.suspend()  # SIGSTOP
        start = time.monotonic()
        out, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        if stopped is not None and stopped.is_running():
            stopped.kill()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "did not finish within train.step_timeout_s=8 s" in err and "rank(s) 1 stopped responding" in err, err
    assert len(err.strip().splitlines()) <= 2, err
    # About 22 s on 2 cores (docs/testing.md has the measured spread): the 8 s step timeout, ~3 s
    # of heartbeats to name the stopped rank, then heft's launcher SIGKILLs the rank still running
    # 10 s after the report (launch/agent.py WORKER_STOP_GRACE_S; torch's agent alone waits 30 s,
    # which would make it ~42 s). The collective timeout (30 s here, 600 s by default) is no part of it.
    record_property("elapsed_s", round(elapsed, 1))
    assert elapsed < 36, elapsed


def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_holder(tiny_train_config, tmp_path):
    """Two runs into one run directory mixed their metrics and checkpoints (issue 22, item 3)."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen([HEFT, "train", str(tiny_train_config), f"train.run_dir={run_dir}", "train.steps=30"],
                             cwd=tmp_path, env=heft_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for_step(first, run_dir, 1)
        holder = json.loads((run_dir / "heft.lock").read_text())
        second = _heft(["train", str(tiny_train_config), f"train.run_dir={run_dir}", "train.steps=30"], cwd=tmp_path)
        _one_error_line(second, "is in use by another run", f"process {holder['pid']}")
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 31))
    assert not (run_dir / "heft.lock").exists()  # released at the end
    # A lock left by a killed run on this machine is stale: the next run takes it over.
    (run_dir / "heft.lock").write_text(json.dumps({**holder, "pid": 2 ** 22 + 1}))
    again = _heft(["train", str(tiny_train_config), f"train.run_dir={run_dir}", "train.steps=31"], cwd=tmp_path)
    assert again.returncode == 0 and "taking over" in again.stdout + again.stderr, again.stderr[-2000:]


def _catches_sigint(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGINT (Python's KeyboardInterrupt) rather than
    the default action (terminate)."""
    caught = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGINT - 1)))


def test_ctrl_c_during_start_up_ends_workers_at_once(tiny_train_config, tmp_path, record_property):
    """Start-up waits inside C++ (the rendezvous, process-group set-up) where KeyboardInterrupt is
    never raised; torchrun's agent then killed such a worker after 30 s (3 of 7 Ctrl-Cs about 8 s
    into a 2-rank start). Until it trains, a worker dies of SIGINT at once; then it stops cleanly."""
    import fcntl

    import psutil

    from heft.data.shm import REGISTRATION_LOCK

    fd = os.open(REGISTRATION_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)  # holds the workers in start-up, at a known point
    proc = subprocess.Popen(
        [HEFT, "train", str(tiny_train_config), f"train.run_dir={tmp_path / 'run'}", "parallel.data=2",
         "train.steps=100000"],
        cwd=tmp_path, env=heft_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not holders_of(REGISTRATION_LOCK) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "heft.launcher.worker" in " ".join(p.cmdline())]
        assert len(workers) == 2 and not any(_catches_sigint(w.pid) for w in workers)
        os.killpg(proc.pid, signal.SIGINT)
        started = time.monotonic()
        _, err = proc.communicate(timeout=60)
        ended_after = time.monotonic() - started
        record_property("ended_after_s", round(ended_after, 2))  # docs/testing.md: the measured spread
        assert ended_after < 10  # torchrun's agent used to take 30 s
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if line.strip()] == [
        "heft: interrupted (Ctrl-C); the workers were stopped; nothing was trained yet"], err[-3000:]


def test_the_ctrl_c_line_says_what_a_rerun_does_when_nothing_was_saved(tiny_train_config, tmp_path):
    from heft.launcher.config import load_config
    from heft.launcher.checkpoint.start import rerun_hint

    cfg = load_config(tiny_train_config, [f"train.run_dir={tmp_path / 'run'}"])
    assert rerun_hint(cfg) == "; nothing was trained yet"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    assert rerun_hint(cfg) == ("; no checkpoint was saved yet, so a rerun needs a new train.run_dir "
                               "(or delete this one)")

def test_ctrl_c_stops_with_one_line(tiny_train_config, tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [HEFT, "train", str(tiny_train_config), f"train.run_dir={run_dir}", "parallel.data=2",
         "train.steps=100000", "checkpoint.interval=3"],
        cwd=tmp_path, env=heft_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_step(proc, run_dir, 4)  # step 3 saved
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "heft.launcher.worker" in " ".join(p.cmdline())]
        assert workers and all(_catches_sigint(w.pid) for w in workers)  # training: stops cleanly
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground job on Ctrl-C
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    # It names what the same command does next: resume from the newest checkpoint (every 3 steps).
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"heft: interrupted (Ctrl-C); the workers were stopped; the same command resumes from "
        f"{run_dir / 'checkpoints'}/step_"), err[-3000:]


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    """`heft status RUN | head` ended in a BrokenPipeError traceback (issue 22, item 14)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "step_time_s": 0.1, "tokens_per_s": 5}\n')
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before heft writes: every write fails with EPIPE
    proc = subprocess.run([sys.executable, "-m", "heft.launcher.cli", "status", str(tmp_path)], stdout=write_end,
                          stderr=subprocess.PIPE, text=True, env=heft_env(), timeout=60)
    os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_a_nan_gradient_is_not_applied(tiny_train_config):
    """A finite loss with a NaN gradient: megatron-core would apply it; heft skips and counts it."""
    import math

    import torch

    from conftest import one_process_world
    from heft.data.loader import Batch
    from heft.launcher.config import load_config
    from heft.launcher.train.optim import build_optimizer
    from heft.launcher.train.step import train_step
    from heft.launcher.train.build import build_loss_reduction, build_model
    from heft.launcher.train.loop import NonFiniteLossError, check_nonfinite
    from heft.model.build import Backends, unwrap

    cfg = load_config(tiny_train_config, ["model.seq_length=32", "train.global_batch_size=2",
                                          "parallel.overlap_grad_reduce=false", "optim.clip_grad=0"])
    with one_process_world(cfg) as layout:
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config

        chunks = build_model(cfg, 257, Backends.detect())
        optimizer, scheduler = build_optimizer(cfg, chunks, bf16=False)
        reduction = build_loss_reduction(cfg, layout, ["a"])
        reduction.install(get_model_config(chunks[0]))
        gpt = unwrap(chunks[0])
        poisoned = gpt.decoder.layers[0].mlp.linear_fc2.weight
        hook = poisoned.register_hook(lambda g: g * float("nan"))
        batch = Batch(tokens=torch.randint(0, 257, (2, 33)), domain=torch.zeros(2, dtype=torch.long),
                      index=torch.arange(2))
        before = {n: p.detach().clone() for n, p in gpt.named_parameters()}
        result = train_step(get_forward_backward_func(), chunks, optimizer, scheduler, reduction, 1,
                            batch, 2, 32)
        assert math.isfinite(result.report.loss) and math.isnan(result.grad_norm)
        assert not result.updated
        for name, param in gpt.named_parameters():
            assert torch.equal(param, before[name]), f"{name} changed"
        assert check_nonfinite(load_config(tiny_train_config, ["train.on_nonfinite_loss=skip"]), 1, result, 0) == 1
        with pytest.raises(NonFiniteLossError, match="gradient norm is nan at step 1"):
            check_nonfinite(cfg, 1, result, 0)
        hook.remove()
        result = train_step(get_forward_backward_func(), chunks, optimizer, scheduler, reduction, 2,
                            batch, 2, 32)
        assert result.updated and not torch.equal(poisoned, before["decoder.layers.0.mlp.linear_fc2.weight"])
