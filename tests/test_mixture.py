"""Domain mixture control: draws, controllers, exact resume, layout invariance, shared-memory hygiene."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import (REFERENCE_RUNS, heft_env, holders_of, python_in_a_fresh_process, read_metrics, run_cases_in_one_job,
                      run_heft)
from heft.data.config import DataConfig, DataConfigError, MixtureConfig
from heft.data.controllers import DoReMi, OnlineDataMixing, Schedule, apply_floor, check_mixture
from heft.data.mixer import DomainExhausted, DomainMixer, draw_step
from heft.launcher.config import ConfigError, load_config

NAMES = ["code", "docs", "legal"]


# --- draws and controllers (no processes) ------------------------------------------------------------

@pytest.mark.parametrize("weights", [[0.5, 0.25, 0.25], [0.9, 0.1, 0.0]])
def test_drawn_fractions_match_static_weights_within_binomial_error(weights):
    steps, batch = 2000, 16
    counts = sum(draw_step(1234, s, np.array(weights), batch)[0] for s in range(1, steps + 1))
    total = steps * batch
    for want, got in zip(weights, counts / total):
        sigma = (want * (1 - want) / total) ** 0.5
        assert abs(got - want) <= 4 * sigma + 1e-12


def test_draws_are_a_function_of_seed_and_step():
    a = draw_step(7, 42, np.array([0.3, 0.7]), 32)
    assert all(np.array_equal(x, y) for x, y in zip(a, draw_step(7, 42, np.array([0.3, 0.7]), 32)))
    assert not np.array_equal(a[1], draw_step(7, 43, np.array([0.3, 0.7]), 32)[1])


def test_scheduled_fractions_follow_the_schedule():
    cfg = MixtureConfig(controller="schedule", schedule=[{"step": 1, "code": 1.0, "docs": 0.0},
                                                         {"step": 101, "code": 0.0, "docs": 1.0}])
    cfg.check()
    schedule = Schedule(cfg, ["code", "docs"], np.array([0.5, 0.5]))
    drawn = np.zeros(2)
    expected = np.zeros(2)
    for step in range(1, 101):
        w = schedule.weights_for(step)
        drawn += draw_step(0, step, w, 64)[0]
        expected += 64 * w
    total = drawn.sum()
    sigma = (0.25 / total) ** 0.5  # bounded by the binomial error at p = 1/2
    assert abs(drawn[0] / total - expected[0] / total) < 4 * sigma
    assert schedule.weights_for(51) == pytest.approx([0.5, 0.5])


def test_schedule_positions_in_steps_tokens_and_fraction_with_update_interval():
    def weights(point_key, positions, step, interval=1, **kwargs):
        cfg = MixtureConfig(controller="schedule", update_interval=interval, schedule=[
            {point_key: positions[0], "a": 1.0}, {point_key: positions[1], "b": 1.0}])
        cfg.check()
        return Schedule(cfg, ["a", "b"], np.array([1.0, 1.0]), **kwargs).weights_for(step)

    assert weights("step", (11, 21), 16) == pytest.approx([0.5, 0.5])
    assert weights("step", (11, 21), 5) == pytest.approx([1.0, 0.0])     # before the first point
    assert weights("step", (11, 21), 99) == pytest.approx([0.0, 1.0])    # after the last
    # tokens: 100 tokens per step; step 16 starts after 1500 tokens
    assert weights("tokens", (1000, 2000), 16, tokens_per_step=100) == pytest.approx([0.5, 0.5])
    # anneal onto b over the last 10% of 100 steps: step 96 starts after 95 steps
    assert weights("fraction", (0.9, 1.0), 96, total_steps=100) == pytest.approx([0.5, 0.5])
    # an update interval of 4 holds the weights of steps 13..16 at step 13's
    assert weights("step", (11, 21), 16, interval=4).tolist() == weights("step", (11, 21), 13).tolist()


def _observe_constant(controller, losses, steps, counts=(8.0, 8.0)):
    history = []
    for step in range(1, steps + 1):
        controller.observe(step, np.array(counts), np.array(losses) * np.array(counts))
        history.append(apply_floor(controller.weights_for(step + 1), controller.cfg.min_weight))
    return history


def test_odm_moves_weight_to_the_domain_with_high_loss_and_floors_hold():
    cfg = MixtureConfig(controller="odm", min_weight=0.1)
    history = _observe_constant(OnlineDataMixing(cfg, ["noise", "easy"], np.array([0.5, 0.5])), [5.5, 0.2], 50)
    # EXP3 keeps exploring with eps_t = sqrt(ln 2 / (2 t)) = 0.083 at t = 50: at most 0.92, floored 0.83
    assert history[-1][0] > 0.8 and history[-1][0] > history[0][0]
    assert min(w[1] for w in history) >= 0.1 - 1e-12


def test_doremi_moves_weight_to_the_domain_with_excess_loss_and_smooths():
    cfg = MixtureConfig(controller="doremi", reference="unused", step_size=0.5, smoothing=0.01)
    controller = DoReMi(cfg, ["noise", "easy"], np.array([0.5, 0.5]), reference=np.array([2.0, 1.0]))
    history = _observe_constant(controller, [3.0, 0.5], 30)  # excess 1.0 and 0 (clipped)
    assert history[-1][0] > 0.95
    assert min(w[1] for w in history) >= 0.01 / 2 - 1e-12  # the smoothing floor c / k


def test_online_update_interval_averages_losses():
    cfg = MixtureConfig(controller="doremi", reference="unused", update_interval=3)
    controller = DoReMi(cfg, ["a", "b"], np.array([0.5, 0.5]), reference=np.array([0.0, 0.0]))
    controller.observe(1, np.array([1.0, 1.0]), np.array([1.0, 0.0]))
    controller.observe(2, np.array([1.0, 1.0]), np.array([1.0, 0.0]))
    assert controller.weights_for(3) == pytest.approx([0.5, 0.5])  # no update before the interval ends
    controller.observe(3, np.array([1.0, 1.0]), np.array([1.0, 0.0]))
    assert controller.weights_for(4)[0] > 0.7


# --- config and data checks before launch ------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("data.proportions={code: -1, docs: 1}", "finite and >= 0"),
    ("data.proportions={code: .nan}", "finite and >= 0"),
    ("data.proportions={code: 0, docs: 0}", "all zero"),
    ("mixture.controller=bandit", "mixture.controller must be one of"),
    ("mixture.controller=schedule", "needs mixture.schedule"),
    ("mixture.controller=doremi", "needs mixture.reference"),
    ("mixture.schedule=[{step: 5, code: 1}, {step: 2, docs: 1}]", "set mixture.controller=schedule"),
])
def test_bad_mixture_configs_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_schedule_points_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="increasing step"):
        load_config(None, ["mixture.controller=schedule", "mixture.schedule=[{step: 5, a: 1}, {step: 2, a: 1}]"])
    with pytest.raises(ConfigError, match="exactly one of step, tokens, fraction"):
        load_config(None, ["mixture.controller=schedule", "mixture.schedule=[{step: 1, a: 1}, {tokens: 9, a: 1}]"])
    cfg = load_config(None, ["mixture.controller=schedule", "mixture.schedule=[{step: 1, code: 1, wiki: 1}]"])
    with pytest.raises(DataConfigError, match=r"unknown domain\(s\) \['wiki'\].*has \['code', 'docs', 'legal'\]"):
        check_mixture(cfg.mixture, NAMES, "data")
    with pytest.raises(DataConfigError, match="min_weight=0.4 times 3 domains"):
        check_mixture(MixtureConfig(min_weight=0.4), NAMES, "data")


def test_doremi_reference_from_file_or_run(tmp_path):
    (tmp_path / "ref.yaml").write_text("code: 1.5\ndocs: 2.0\n")
    with pytest.raises(DataConfigError, match=r"no loss for domain\(s\) \['legal'\]"):
        check_mixture(MixtureConfig(controller="doremi", reference=str(tmp_path / "ref.yaml")), NAMES, "d")
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, **{f"domain_{n}_loss": 3.0 for n in NAMES}},
            {"step": 2, "eval_loss": 2.0, **{f"eval_{n}_loss": i + 1.0 for i, n in enumerate(NAMES)}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = check_mixture(MixtureConfig(controller="doremi", reference=str(run)), NAMES, "d")
    assert got.tolist() == [1.0, 2.0, 3.0]


def test_bad_weights_fail_before_launch_in_one_line(tiny_train_config):
    proc = run_heft(["train", str(tiny_train_config), "mixture.controller=schedule",
                     "mixture.schedule=[{step: 1, code: 1}, {step: 9, wiki: 1}]"], check=False, timeout=120)
    assert proc.returncode == 2
    assert "unknown domain(s) ['wiki']" in proc.stderr and "'code', 'docs', 'legal'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- the mixer over real streaming datasets (one process) ----------------------------------------------

def _mixer(path, mixture=None, state=None, replica=0, replicas=1, batch=8, weights=None):
    data = DataConfig(path=str(path), proportions=weights or {"code": 0.5, "docs": 0.25, "legal": 0.25})
    return DomainMixer(data, mixture or MixtureConfig(), batch, replica, replicas, seed=1234,
                       total_steps=100, seq_length=64, state=state)


def _ids(batch):
    return list(zip(batch.domain.tolist(), batch.index.tolist()))


def test_exhausted_domain_reshuffles_or_stops(tmp_path):
    from heft.data.prepare import prepare

    data = tmp_path / "data"
    # tiny: 271 bytes + EOS = 16 samples of 17 tokens, two whole batches of 8
    prepare({"big": ["x" * 4000], "tiny": ["y" * 271]}, data, tokenizer="byte", seq_length=16, val_fraction=0.0)
    tiny_size = json.loads((data / "manifest.json").read_text())["domains"][1]["train"]["samples"]
    mixer = _mixer(data, weights={"big": 0.0, "tiny": 1.0})
    seen = [i for _ in range(2 * tiny_size // 8 + 1) for _, i in _ids(next(mixer))]
    mixer.close()
    first, second = seen[:tiny_size], seen[tiny_size:2 * tiny_size]
    assert sorted(first) == sorted(second) == list(range(tiny_size)) and first != second  # new shuffle
    stopping = _mixer(data, MixtureConfig(on_exhausted="stop"), weights={"big": 0.0, "tiny": 1.0})
    with pytest.raises(DomainExhausted, match=r"domain 'tiny' ran out of samples at step \d+"):
        for _ in range(tiny_size):
            next(stopping)
    stopping.close()


def test_mixer_state_resumes_exactly_under_another_data_parallel_size(small_corpus):
    mixture = MixtureConfig(controller="schedule", schedule=[{"step": 1, "code": 1}, {"step": 6, "docs": 1, "legal": 1}])
    straight = _mixer(small_corpus, mixture)
    steps = [_ids(next(straight)) for _ in range(8)]
    straight.close()
    first = _mixer(small_corpus, mixture)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # it travels as JSON in the checkpoint
    first.close()
    halves = [_mixer(small_corpus, mixture, state, replica=r, replicas=2) for r in (0, 1)]
    for step in range(3, 8):
        assert _ids(next(halves[0])) + _ids(next(halves[1])) == steps[step], f"step {step + 1}"
    for mixer in halves:
        mixer.close()


def test_a_changed_mixture_config_wins_on_resume(small_corpus, capsys):
    """The static controller restored its saved weights over a changed data.proportions, against
    the README (issue 22, item 7). Unchanged: the saved state resumes exactly; changed: this run's."""
    first = _mixer(small_corpus)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    same = _mixer(small_corpus, state=state)
    assert np.allclose(same.controller.weights, [0.5, 0.25, 0.25]) and "changed" not in capsys.readouterr().out
    same.close()
    changed = _mixer(small_corpus, state=state, weights={"code": 0.0, "docs": 1.0, "legal": 0.0})
    assert "data.proportions changed since the checkpoint" in capsys.readouterr().out
    next(changed)  # the step the checkpoint had planned already
    assert {d for d, _ in _ids(next(changed))} == {1}  # then only docs
    changed.close()
    legacy = json.loads(json.dumps(state))
    del legacy["controller"]["config"]  # a checkpoint from before heft recorded the config
    older = _mixer(small_corpus, state=legacy, weights={"code": 0.0, "docs": 1.0, "legal": 0.0})
    assert np.allclose(older.controller.weights, [0.0, 1.0, 0.0])
    older.close()


def test_a_truncated_shard_names_the_domain_and_file(tmp_path, small_corpus):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(small_corpus, data)
    mixer = _mixer(data, weights={"code": 0.0, "docs": 1.0, "legal": 0.0}, mixture=MixtureConfig(prefetch=False))
    for shard in (data / "docs" / "train").glob("shard.*.mds"):
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataConfigError, match=r"domain 'docs': reading sample \d+ from .*docs/train/shard\.\d+\.mds failed"):
        next(mixer)
    mixer.close()


# Counts the descriptors the mixer opens, less those into the shared memory of datasets other
# processes registered before (streaming opens every one of those too: ten per live dataset on the
# machine, so the plain count depended on what else ran; CI's was 124 where this machine's was 43).
_COUNT_DESCRIPTORS = """
import os, sys
from heft.data.config import DataConfig, MixtureConfig
from heft.data.mixer import DomainMixer
def targets():
    return {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}
others = {name.split("_", 1)[0] for name in os.listdir("/dev/shm")}
before = targets()
mixer = DomainMixer(DataConfig(path=sys.argv[1]), MixtureConfig(), 8, 0, 1, seed=1, total_steps=10, seq_length=16)
next(mixer)
opened = [t for fd, t in targets().items() if fd not in before]
print(sum(not (t.startswith("/dev/shm/") and t[9:].split("_", 1)[0] in others) for t in opened))
"""


def test_many_domains_cost_a_worker_few_file_descriptors(tmp_path):
    """Streaming keeps open every segment of every dataset registered before it in the process: one
    dataset per domain cost 5 N^2 descriptors (9,160 at 40 domains; 1,024 is a common limit)."""
    from heft.data.prepare import prepare

    domains = 30
    prepare({f"d{i}": [f"text of domain {i} " * 40] for i in range(domains)}, tmp_path / "data",
            tokenizer="byte", seq_length=16, val_fraction=0.0)
    out = python_in_a_fresh_process(_COUNT_DESCRIPTORS, str(tmp_path / "data"))
    assert int(out.split()[-1]) < 4 * domains, out  # the shards read, and one dataset's segments

# --- stale shared memory -------------------------------------------------------------------------------

_HOLD_DATASET = """
import os, signal, sys, time
from heft.data.streaming_lib import StreamingDataset
from heft.data.shm import mark_in_use
mark_in_use(StreamingDataset(local=sys.argv[1], shuffle=False, batch_size=1)._shm_prefix_int)
print("ready", flush=True)
if sys.argv[2] == "die":  # as a killed job dies: with its resource tracker, which would clean up
    os.killpg(os.getpgid(0), signal.SIGKILL)
time.sleep(600)
"""


def _hold(local: Path, how: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_DATASET, str(local), how], stdout=subprocess.PIPE,
                            text=True, env=heft_env(), start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _prefixes_for(local: Path) -> set[str]:
    from heft.data.shm import _locals_of

    return {p.name[:6] for p in Path("/dev/shm").glob("*_locals") if str(local) in (_locals_of(p.name[:6]) or [])}


def test_stale_shared_memory_of_this_data_is_cleaned_and_nothing_else(tmp_path, small_corpus):
    import shutil

    from heft.data.shm import clean_stale_streaming_state

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    shutil.copytree(small_corpus / "code", ours / "code")
    shutil.copytree(small_corpus / "code", theirs / "code")
    killed = _hold(ours / "code" / "train", "die")
    killed.wait()
    other_killed = _hold(theirs / "code" / "train", "die")
    other_killed.wait()
    live = _hold(ours / "code" / "train", "live")  # another job reading the same data right now
    try:
        stale_ours, live_ours = _prefixes_for(ours / "code" / "train"), set()
        assert len(stale_ours) == 2
        removed = set(clean_stale_streaming_state(ours))
        live_ours = _prefixes_for(ours / "code" / "train")
        assert len(removed) == 1 and len(live_ours) == 1 and removed | live_ours == stale_ours
        assert len(_prefixes_for(theirs / "code" / "train")) == 1  # not ours to judge
    finally:
        live.send_signal(signal.SIGTERM)
        live.wait()
        from heft.data.shm import SHM_DIR
        for prefix in _prefixes_for(theirs / "code" / "train"):  # tidy this test's own leftovers
            for path in SHM_DIR.glob(f"{prefix}_*"):
                path.unlink(missing_ok=True)
    assert os.path.isdir(ours / "code" / "train")


def test_a_stale_prefix_without_its_locals_segment_is_cleaned_too(tmp_path, small_corpus):
    """A dataset torn down midway can lose its locals segment first; its other segments then leaked
    for good, since the cleaner skipped prefixes without locals (issue 22, item 2)."""
    import shutil

    from heft.data.shm import SHM_DIR, clean_stale_streaming_state

    shutil.copytree(small_corpus / "code", tmp_path / "data" / "code")
    killed = _hold(tmp_path / "data" / "code" / "train", "die")
    killed.wait()
    (prefix,) = _prefixes_for(tmp_path / "data" / "code" / "train")
    (SHM_DIR / f"{prefix}_locals").unlink()
    leftovers = [p for p in SHM_DIR.iterdir() if p.name.startswith(f"{prefix}_") or p.name.startswith(f"heft-{prefix}-")]
    assert leftovers
    assert prefix in clean_stale_streaming_state(tmp_path / "data")
    assert not [p for p in leftovers if p.exists()]


def test_a_job_registers_its_datasets_only_while_no_other_job_on_the_machine_does(tmp_path, tiny_train_config):
    """Two jobs starting at once on one machine raced in streaming's prefix registration
    ("File exists: /000000_locals", about one start in four on this machine); heft's jobs take
    turns. While another job holds the machine's registration lock, a run waits at it and trains
    nothing; once the lock is free it finishes."""
    import fcntl
    import time

    from heft.data.shm import REGISTRATION_LOCK

    fd = os.open(REGISTRATION_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another job" registering its datasets
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "heft.launcher.cli", "train", str(tiny_train_config),
                             f"train.run_dir={run_dir}", "train.steps=2"],
                            env=heft_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not holders_of(REGISTRATION_LOCK) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        assert proc.poll() is None, proc.stdout.read()
        assert holders_of(REGISTRATION_LOCK) and not (run_dir / "metrics.jsonl").exists()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]


def test_a_registration_lock_held_too_long_is_said_and_passed(capsys):
    import fcntl

    from heft.data.shm import REGISTRATION_LOCK, one_job_registers_at_a_time

    fd = os.open(REGISTRATION_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with one_job_registers_at_a_time(wait_s=0.3):
            entered = True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert entered and "registering the datasets without it" in capsys.readouterr().out


# --- real training runs (torchrun, gloo) ----------------------------------------------------------------

def _sample_ids(run_dir: Path) -> dict[int, list]:
    """Per step, the (domain, index) pairs consumed, over all replicas in data-parallel order
    (global rank order: heft orders ranks data-parallel-outermost)."""
    by_step: dict[int, dict[int, list]] = {}
    for path in (run_dir / "sample_weights").glob("rank*.jsonl"):
        rank = int(path.stem[len("rank"):])
        for line in path.read_text().splitlines():
            row = json.loads(line)
            by_step.setdefault(row["step"], {}).setdefault(rank, []).append((row["domain"], row["index"]))
    return {step: [s for rank in sorted(ranks) for s in ranks[rank]] for step, ranks in by_step.items()}


@pytest.mark.slow
def test_resume_under_tp2_dp2_consumes_the_same_samples_while_online_weights_change(tmp_path, tiny_train_config,
                                                                                 layout_runs):
    common = [str(tiny_train_config), *REFERENCE_RUNS["mixture/odm_tp2_dp2"]]
    straight, split = layout_runs["mixture/odm_tp2_dp2"], tmp_path / "split"
    run_heft(["train", *common, f"train.run_dir={split}", "train.stop_at_step=4"], timeout=300)
    run_heft(["train", *common, f"train.run_dir={split}"], timeout=300)
    want, got = _sample_ids(straight), _sample_ids(split)
    assert sorted(want) == list(range(1, 9)) and all(len(want[s]) == 8 for s in want)
    for step in range(1, 9):
        assert got[step] == want[step], f"step {step}"
    targets = [{k: v for k, v in r.items() if k.startswith("mixture_")} for r in read_metrics(straight)]
    assert len({json.dumps(t, sort_keys=True) for t in targets}) > 2  # the weights did change
    assert targets == [{k: v for k, v in r.items() if k.startswith("mixture_")} for r in read_metrics(split)]


def _global_batches(ranks):
    """Each step's global batch (4 processes): the replicas' shares in DP order."""
    replicas = {r["dp_rank"]: r["batches"] for r in ranks if r["tp_rank"] == 0}
    steps = len(replicas[0])
    return [[tuple(s) for dp in sorted(replicas) for s in replicas[dp][step]] for step in range(steps)]


def test_dp4_and_tp2_dp2_consume_the_same_samples_per_step(batch_dumps):
    """The schedule: all code from step 1, docs and legal only from step 6 (conftest.DUMP_CASES)."""
    dp4 = _global_batches(batch_dumps["schedule/dp4"])
    tp2dp2 = _global_batches(batch_dumps["schedule/tp2_dp2"])
    assert len(dp4) == 8 and dp4 == tp2dp2
    assert {d for d, _ in dp4[0]} == {0} and {d for d, _ in dp4[7]} <= {1, 2}


@pytest.fixture(scope="module")
def noise_and_easy(tmp_path_factory) -> Path:
    """Two domains: random bytes (the loss stays high) and one repeated phrase (learnt at once)."""
    from heft.data.prepare import prepare

    rng = random.Random(0)
    noise = ["".join(chr(rng.randrange(33, 127)) for _ in range(20_000))]
    out = tmp_path_factory.mktemp("mix") / "data"
    prepare({"noise": noise, "easy": ["abcd " * 4_000]}, out, tokenizer="byte", seq_length=32)
    return out


CONTROLLERS = ("odm", "doremi")


@pytest.fixture(scope="module")
def controller_runs(tmp_path_factory, noise_and_easy) -> dict[str, Path]:
    """controller -> run directory: 24 steps on noise_and_easy, both controllers trained by heft's
    own training loop in one single-process torchrun job (conftest.run_cases_in_one_job)."""
    root = tmp_path_factory.mktemp("controllers")
    (root / "ref.yaml").write_text("noise: 3.0\neasy: 0.0\n")
    config = root / "mix.yaml"
    config.write_text(f"data: {{path: {noise_and_easy}}}\n")
    cases = [{"name": controller, "config": str(config), "overrides": [
        "model.preset=tiny", "model.seq_length=32", "train.steps=24", "train.global_batch_size=16",
        "train.micro_batch_size=8", "train.log_interval=4", f"train.run_dir={root / controller}",
        "optim.lr=0.01", "parallel.data=1", "checkpoint.interval=0", f"mixture.controller={controller}",
        "mixture.update_interval=2", "mixture.min_weight=0.1", f"mixture.reference={root / 'ref.yaml'}"]}
        for controller in CONTROLLERS]
    run_cases_in_one_job("train_cases.py", cases, 1, root / "cases.json")
    return {controller: root / controller for controller in CONTROLLERS}


@pytest.mark.slow
@pytest.mark.parametrize("controller", CONTROLLERS)
def test_online_controllers_move_weight_to_the_domain_still_learning(controller_runs, controller):
    run_dir = controller_runs[controller]
    records = read_metrics(run_dir)
    noise = [r["mixture_noise_target"] for r in records]
    easy = [r["mixture_easy_target"] for r in records]
    # Early on "easy" has the larger loss too (nothing is learnt yet); once it is learnt, weight
    # moves to "noise", whose loss cannot fall.
    assert noise[-1] > max(0.45, noise[0] + 0.15), noise
    assert min(easy) >= 0.1 - 1e-9, easy
    # Telemetry: the realised fraction follows the target, and TensorBoard has a curve per domain.
    realised = [r["mixture_noise_realised"] for r in records]
    half = len(realised) // 2
    assert sum(realised[half:]) / (len(realised) - half) > sum(realised[:half]) / half, realised
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from heft.launcher.metrics.plot import plot_run

    assert plot_run(run_dir).stat().st_size > 10_000  # with the mixture panel
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/mixture_noise_target", "train/mixture_easy_target",
            "train/mixture_noise_realised", "train/data_wait_s"} <= tags
