"""Shared fixtures: a small prepared corpus and a helper that runs real `heft train` jobs."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _raise_open_file_limit() -> None:
    """Margin for the pytest process, which builds streaming datasets and one-process worlds in
    itself: streaming keeps each dataset's shared memory open until the process exits, and each new
    dataset also opens those of the datasets before it (587 descriptors at the peak of the suite,
    measured with a limit of 1,024, a common soft limit, CI's among them). Raised to the hard limit, never past it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


_raise_open_file_limit()


# --- counting the processes each test starts (docs/testing.md) --------------------------------------

COUNT_VAR = "HEFT_TEST_PROCESS_COUNTS"
"""When set to a file path, every process a test starts is classified and counted per test file, and
the counts are written there as JSON at the end of the session (tests/timing_table.py reads them)."""


def process_kind(argv) -> str | None:
    """What a command line a test starts is: 'torchrun' (a heft train/eval, or torchrun itself, which
    starts the workers), 'slurm' (a job submitted), 'heft' (another heft command), or None."""
    args = [str(a) for a in (argv if isinstance(argv, (list, tuple)) else [argv])]
    text = " ".join(args)
    heft = "heft.launcher.cli" in text or (args and args[0].endswith("/heft"))
    if "torch.distributed.run" in text or (heft and any(a in ("train", "eval") for a in args)):
        return "torchrun"
    if (args and Path(args[0]).name == "sbatch") or (heft and "submit" in args and "--dry-run" not in args):
        return "slurm"
    return "heft" if heft else None


def _start_counting(path: str) -> None:
    import atexit
    import collections
    import traceback

    counts: dict = collections.defaultdict(collections.Counter)
    original = subprocess.Popen.__init__

    def counting_init(self, args, *rest, **kwargs):
        kind = process_kind(args)
        if kind:  # pytest names the test being set up, run or torn down (a fixture's processes too)
            current = os.environ.get("PYTEST_CURRENT_TEST", "")
            test_file = current.split("::", 1)[0] if current else next(
                (f.filename for f in reversed(traceback.extract_stack()) if Path(f.filename).name.startswith("test_")),
                "other")
            counts[Path(test_file).name][kind] += 1
        original(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = counting_init
    atexit.register(lambda: Path(path).write_text(json.dumps(counts, indent=1, sort_keys=True)))


if os.environ.get(COUNT_VAR):
    _start_counting(os.environ[COUNT_VAR])


# A child `heft` must decide for itself whether it is a worker: never inherit these.
_DISTRIBUTED_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT", "TORCHELASTIC_RUN_ID", "GROUP_RANK")


def heft_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_VARS and not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def python_in_a_fresh_process(script: str, *args: str, timeout: int = 120) -> str:
    """Run ``python -c script args...`` in a new interpreter (nothing imported yet, unlike the
    pytest process); returns its stdout, and fails the test with its stderr if it fails."""
    proc = subprocess.run([sys.executable, "-c", script, *args], env=heft_env(), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def ctrl_c_as_at_a_terminal() -> None:
    """preexec_fn for a child that a test sends SIGINT: SIGINT at its default, as in a terminal's
    foreground job. A pytest started in the background by a non-interactive shell (`pytest &` in a
    script) ignores SIGINT, its children inherit that, and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_heft(args: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `heft` CLI in a subprocess (it launches torchrun itself)."""
    proc = subprocess.run([sys.executable, "-m", "heft.launcher.cli", *args], cwd=REPO, env=heft_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"heft {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_heft_side_by_side(commands: list[list[str]], timeout: int = 300,
                          check: bool = True) -> list[subprocess.CompletedProcess]:
    """:func:`run_heft` on each command at once (for commands that do not depend on each other:
    most of a short `heft` command is one core importing torch)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: run_heft(args, timeout=timeout, check=check), commands))


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    """Training records (kind='train') or evaluation records (kind='eval') of a run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if ("eval_loss" in r) == (kind == "eval")]


def read_mds_split(directory: Path) -> list:
    """The token rows of one prepared MDS split, in order, read straight from its shards.

    Not through ``StreamingDataset``: streaming keeps every dataset's shared memory open until the
    process exits (an atexit hook holds each segment) and each new one opens those of all before it,
    so the descriptors grow with the square of the datasets built; test_data and test_prepare
    alone built enough to hold 252."""
    from heft.data.streaming_lib import LocalDataset

    if not directory.exists():
        return []
    dataset = LocalDataset(local=str(directory))
    return [dataset[i]["tokens"] for i in range(len(dataset))]


def holders_of(path: Path) -> set[int]:
    """Processes (other than this one) that have ``path`` open."""
    holders = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                holders.add(int(fd_dir.parent.name))
        except OSError:
            continue
    return holders - {os.getpid()}


@contextlib.contextmanager
def one_process_world(cfg):
    """A real one-rank gloo group and megatron-core's parallel state inside the pytest process.
    The environment it needs is restored afterwards, so child `heft` runs never inherit it."""
    from heft.model import cpu_compat
    from heft.launcher.train.build import start_processes
    from heft.model.parallel import shutdown

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = dict(os.environ)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cpu_compat.enable_if_no_cuda()
    try:
        yield start_processes(cfg)
    finally:
        shutdown()
        os.environ.clear()
        os.environ.update(saved)
        _OPENED_WORLDS.append(True)


_OPENED_WORLDS: list = []


def pytest_runtest_teardown(item):
    """After a test that opened a one-process world: what it built (models, optimizers) holds the
    process groups in reference cycles, and their sockets and pipes stay open until a collection."""
    if _OPENED_WORLDS:
        import gc

        _OPENED_WORLDS.clear()
        gc.collect()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The demo corpus with small per-domain budgets, byte tokenizer, seq_length 64."""
    from heft.data.demo_corpus import demo_documents
    from heft.data.prepare import prepare

    out = tmp_path_factory.mktemp("corpus") / "data"
    prepare(demo_documents({"code": 300_000, "docs": 150_000, "legal": 150_000}), out,
            tokenizer="byte", seq_length=64)
    return out


@pytest.fixture(scope="session")
def tiny_train_config(tmp_path_factory, small_corpus) -> Path:
    path = tmp_path_factory.mktemp("configs") / "tiny.yaml"
    path.write_text(f"""
model: {{preset: tiny, seq_length: 64}}
data: {{path: {small_corpus}, proportions: {{code: 0.5, docs: 0.25, legal: 0.25}}, num_canonical_nodes: 1}}
train: {{steps: 3, global_batch_size: 8, micro_batch_size: 2, log_interval: 1, tensorboard: false}}
optim: {{lr: 3.0e-3, warmup_steps: 0}}
""")
    return path


def run_cases_in_one_job(worker: str, cases: list[dict], world: int, listing: Path) -> None:
    """Run tests/workers/``worker`` under torchrun with ``world`` processes on the cases listed
    (written to ``listing`` as JSON); fails the test with the job's output if it fails."""
    listing.write_text(json.dumps(cases, indent=1))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                           str(REPO / "tests" / "workers" / worker), str(listing)], env=heft_env(),
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    listing.with_suffix(".log").write_text(proc.stdout + proc.stderr)  # each case's time, for a slow run
    assert proc.returncode == 0, f"{worker} on {world} processes failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


SCHEDULE = ["mixture.controller=schedule", "mixture.schedule=[{step: 1, code: 1}, {step: 6, docs: 1, legal: 1}]"]
DUMP_CASES = {
    # test_data.py: replicas get disjoint samples, the ranks of a replica the same ones
    "replicas/tp2_dp2": (["parallel.tensor=2", "parallel.data=2"], 20),
    "replicas/pp2_dp2": (["parallel.pipeline=2", "parallel.data=2"], 20),
    # test_data.py: the static proportions hold over 150 steps (of 4 replicas: one job with the cases above)
    "proportions/dp4": (["parallel.data=4"], 150),
    # test_mixture.py: a scheduled mixture draws the same global batches under DP4 and TP2 x DP2
    "schedule/dp4": (["parallel.data=4", *SCHEDULE], 8),
    "schedule/tp2_dp2": (["parallel.tensor=2", "parallel.data=2", *SCHEDULE], 8),
}


@pytest.fixture(scope="session")
def batch_dumps(tiny_train_config, tmp_path_factory) -> dict[str, list[dict]]:
    """For each case of DUMP_CASES (layout overrides of the tiny config, steps): per rank, its layout
    coordinates and the (domain, index) pairs of each of its batches, from heft's own data iterator
    in real torchrun processes (tests/workers/dump_batches.py; one torchrun job per world size)."""
    root = tmp_path_factory.mktemp("batch-dumps")
    by_world: dict[int, list[dict]] = {}
    outs = {}
    for name, (overrides, steps) in DUMP_CASES.items():
        outs[name] = root / name.replace("/", "-")
        by_world.setdefault(world_size_of(overrides), []).append(
            {"name": name, "out": str(outs[name]), "steps": steps, "config": str(tiny_train_config),
             "overrides": overrides})
    for world, cases in sorted(by_world.items()):
        run_cases_in_one_job("dump_batches.py", cases, world, root / f"cases-{world}.json")
    return {name: [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))] for name, out in outs.items()}


# --- layout runs: many layouts, few launches -----------------------------------------------------

PARITY_LAYOUTS = {
    "tp2_pp2": ["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=1"],
    "tp2_dp2": ["parallel.tensor=2", "parallel.data=2"],
    "pp2_dp2": ["parallel.pipeline=2", "parallel.data=2"],
    "pp2_vpp2_dp2": ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.data=2"],
    "dp4_distributed_optimizer": ["parallel.data=4", "parallel.distributed_optimizer=true"],
    # torch SDPA core attention (CUDA's default without Transformer Engine) under TP and PP, with
    # grouped-query heads split over TP, against the local attention's single process.
    "tp2_pp2_sdpa": ["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=1", "train.attention=sdpa"],
}
# r = 1.0 (one of the paper's two settings). Per-sample losses of two layouts differ by float
# reordering (~1e-7 relative), and min-max normalisation amplifies that by about 2d/(r*span), span
# being the loss range of the batch; at r = 0.4 on this 4-layer model's early, narrow loss range the
# weights agree to ~5e-6 only, too close to 1e-5 for a test (docs/reweighting.md has the numbers).
REWEIGHT = ["reweight.strategy=linupper", "reweight.temperature=1.0", "reweight.log_sample_weights=true"]
REWEIGHT_GLOBAL_LAYOUTS = {
    "dp4": ["parallel.data=4"],
    "tp2_dp2": ["parallel.tensor=2", "parallel.data=2"],
    "pp2_dp2": ["parallel.pipeline=2", "parallel.data=2"],
    "tp2_pp2_dp1": ["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=1"],
}
REWEIGHT_MICROBATCH_LAYOUTS = {
    "dp2": ["parallel.data=2"],
    "tp2_dp2": ["parallel.tensor=2", "parallel.data=2"],
    "pp2_dp2": ["parallel.pipeline=2", "parallel.data=2"],
}
EVAL_BATCH = ["train.global_batch_size=16", "train.micro_batch_size=8"]
EVAL_LAYOUTS = {
    "single": ["parallel.data=1"],
    "tp2_pp2": ["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=1"],
    "dp2": ["parallel.data=2"],
}
PRECISION_RUNS = {
    "fp32": [], "recompute_full": ["train.recompute=full"], "recompute_selective": ["train.recompute=selective"],
    "bf16": ["train.precision=bf16"],
}


def layout_cases() -> dict[str, list[str]]:
    """Every run the layout tests compare (test_parity, test_reweighting_layouts, test_train) and
    the reference runs of REFERENCE_RUNS, by name: the overrides of the tiny config (3 steps unless
    a case says otherwise)."""
    cases = {"parity/reference": ["parallel.data=1"]}
    cases.update({f"parity/{name}": layout for name, layout in PARITY_LAYOUTS.items()})
    cases["reweight/reference"] = [*REWEIGHT, "parallel.data=1"]
    cases.update({f"reweight/global/{name}": [*REWEIGHT, *layout] for name, layout in REWEIGHT_GLOBAL_LAYOUTS.items()})
    cases.update({f"reweight/microbatch/{name}": [*REWEIGHT, "reweight.scope=microbatch", *layout]
                  for name, layout in REWEIGHT_MICROBATCH_LAYOUTS.items()})
    # Micro batch 8 (global batch 16, so that DP2 can have it): a quarter of the evaluation's
    # microbatches, pipeline and TP messages of micro batch 2.
    cases.update({f"eval/{name}": ["train.steps=2", "train.eval_interval=1", *EVAL_BATCH, *layout]
                  for name, layout in EVAL_LAYOUTS.items()})
    cases.update({f"precision/{name}": ["parallel.tensor=2", "parallel.data=1", *extra]
                  for name, extra in PRECISION_RUNS.items()})
    cases.update(REFERENCE_RUNS)
    return cases


# The uninterrupted runs that resume, fault and export tests compare with or start from. A test
# that changes such a run's directory works on a copy.
CHECKPOINT_REWEIGHT = ["reweight.strategy=linupper", "reweight.temperature=1.0"]
TP2_PP2 = ["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=1"]
FUSED_AND_OVERLAPPED = ["parallel.data=2", "parallel.distributed_optimizer=true", "optim.adam_impl=fused",
                        "parallel.overlap_param_gather=true"]
REFERENCE_RUNS = {
    # test_checkpoint.py
    "checkpoint/tp2_pp2": ["train.steps=6", "checkpoint.interval=3", *CHECKPOINT_REWEIGHT, *TP2_PP2],
    "checkpoint/pp2_vpp2_dp2_microbatch": [
        "train.steps=6", "checkpoint.interval=3", *CHECKPOINT_REWEIGHT, "parallel.pipeline=2",
        "parallel.virtual_pipeline=2", "parallel.data=2", "reweight.scope=microbatch"],
    "checkpoint/fused_overlapped": ["train.steps=6", "checkpoint.interval=3", *CHECKPOINT_REWEIGHT,
                                    *FUSED_AND_OVERLAPPED],
    "checkpoint/fused_gathered_at_step_3": [
        "train.steps=6", "checkpoint.interval=3", *CHECKPOINT_REWEIGHT, *FUSED_AND_OVERLAPPED[:-1],
        "parallel.overlap_param_gather=false", "train.stop_at_step=3"],
    "checkpoint/dp2_40_steps": ["train.steps=40", "checkpoint.interval=0", *CHECKPOINT_REWEIGHT, "parallel.data=2"],
    "checkpoint/dp2_five_checkpoints": ["train.steps=6", *CHECKPOINT_REWEIGHT, "parallel.data=2",
                                        "checkpoint.interval=1", "checkpoint.keep=5"],
    "checkpoint/dp2_tensorboard_5_steps": ["train.steps=5", "checkpoint.interval=3", *CHECKPOINT_REWEIGHT,
                                           "parallel.data=2", "train.tensorboard=true"],
    # test_hf.py: tied embeddings, GQA (4 heads, 2 groups), byte tokenizer; evaluated at the end
    # (micro batch 8: a quarter of the evaluation's microbatches)
    "hf/tied": ["model.seq_length=64", *TP2_PP2, "train.steps=2", "train.eval_at_end=true", *EVAL_BATCH],
    # test_mixture.py: online ODM weights changing every 2 steps, under TP2 x DP2
    "mixture/odm_tp2_dp2": ["parallel.tensor=2", "parallel.data=2", "train.steps=8", "mixture.controller=odm",
                            "mixture.update_interval=2", "mixture.min_weight=0.05",
                            "reweight.log_sample_weights=true", "checkpoint.interval=0"],
    # test_multinode.py: what two launchers of one process each must equal
    "multinode/dp2_4_steps": ["parallel.data=2", "train.steps=4", "reweight.strategy=linupper"],
    # test_train.py, test_reweighting_telemetry.py
    "train/dp2_tensorboard": ["train.tensorboard=true", "parallel.data=2"],
    "telemetry/linupper_dp2": ["train.tensorboard=true", "train.steps=4", "parallel.data=2",
                               "reweight.strategy=linupper", "reweight.temperature=0.5"],
}


def world_size_of(overrides: list[str]) -> int:
    """The processes a case needs: tensor x pipeline x data (context parallel is 1 in these runs)."""
    sizes = {"tensor": 1, "pipeline": 1, "data": 1}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith("parallel.") and key.split(".", 1)[1] in sizes:
            sizes[key.split(".", 1)[1]] = int(value)
    return sizes["tensor"] * sizes["pipeline"] * sizes["data"]


class _RunsByWorldSize(dict):
    """name -> run directory; the first look-up of a case trains every case of its world size in one
    torchrun job (so a test that needs one run, `pytest -k ...`, waits for its world size only)."""

    def __init__(self, root: Path, config: Path, extra_cases: dict[str, list[str]]):
        super().__init__()
        self._cases: dict[int, list[dict]] = {}
        self._world_of: dict[str, int] = {}
        self._root = root
        for name, overrides in {**layout_cases(), **extra_cases}.items():
            run_dir = root / name.replace("/", "-")
            world = world_size_of(overrides)
            self._world_of[name] = world
            self._cases.setdefault(world, []).append(
                {"name": name, "config": str(config), "overrides": [f"train.run_dir={run_dir}", *overrides]})
        self._trained: set[int] = set()

    def __getitem__(self, name: str) -> Path:
        world = self._world_of[name]  # a KeyError names an unknown case
        if world not in self._trained:
            self._train(world)
        return self._root / name.replace("/", "-")

    def _train(self, world: int) -> None:
        run_cases_in_one_job("train_cases.py", self._cases[world], world, self._root / f"cases-{world}.json")
        self._trained.add(world)


@pytest.fixture(scope="session")
def bpe_corpus(tmp_path_factory) -> Path:
    """A small corpus with a trained BPE tokenizer (vocabulary 400), prepared once per session."""
    from heft.data.demo_corpus import demo_documents
    from heft.data.prepare import prepare

    out = tmp_path_factory.mktemp("bpe_corpus") / "data"
    prepare(demo_documents({"code": 120_000, "docs": 60_000, "legal": 60_000}), out, tokenizer="bpe",
            seq_length=64, bpe_vocab_size=400)
    return out


@pytest.fixture(scope="session")
def layout_runs(tiny_train_config, bpe_corpus, tmp_path_factory) -> dict[str, Path]:
    """The run directory of every case of :func:`layout_cases`, trained once per session by heft's
    own training loop: one torchrun job per world size runs all its cases one after another
    (tests/workers/train_cases.py), 3 launches instead of 32, each on first use. Also test_hf's
    untied run on the BPE corpus (its data path is known only here)."""
    untied_bpe = ["model.seq_length=64", *TP2_PP2, "train.steps=1", "model.tie_embeddings=false",
                  f"data.path={bpe_corpus}"]
    return _RunsByWorldSize(tmp_path_factory.mktemp("layout-runs"), tiny_train_config, {"hf/untied_bpe": untied_bpe})


def wait_for_step(proc, run_dir: Path, step: int, limit: float = 180) -> None:
    """Wait until a running `heft train` has logged ``step`` (its metrics.jsonl says so)."""
    import time

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"heft exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(json.loads(line).get("step", 0) >= step
                                  for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {limit} s")


def worker_with_rank(parent_pid: int, rank: int):
    """The heft worker process of global ``rank`` below a `heft train` process."""
    import psutil

    for child in psutil.Process(parent_pid).children(recursive=True):
        try:
            if "heft.launcher.worker" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.fixture(scope="session")
def heft_wheel(tmp_path_factory) -> Path:
    """heft's wheel, built by pip from the files git tracks (what a clean clone builds); one build
    for the tests that look inside it."""
    source = tmp_path_factory.mktemp("wheel-source")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    dist = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(dist), str(source)], check=True, capture_output=True)
    return next(dist.glob("heft-*.whl"))


# --- tiers -------------------------------------------------------------------------------------------

QUICK_FILES = {"test_config.py", "test_compat_shims.py", "test_prepare.py", "test_layering.py", "test_optim.py",
               "test_model.py", "test_plan.py", "test_environment.py", "test_out_of_memory.py",
               "test_reweighting_unit.py", "test_reweighting_gradient.py"}
"""`make test-quick`: files whose tests run in the pytest process or start a process briefly."""
QUICK_END_TO_END = "test_first_hour.py::test_trains_from_a_directory_with_data_model_launcher_modules"
"""...and one real `heft train` (two ranks over torchrun and gloo, two steps)."""


def pytest_collection_modifyitems(config, items):
    """Mark the quick tier (`pytest -m quick`); `make test` still runs everything."""
    for item in items:
        name = Path(str(item.fspath)).name
        in_quick_file = name in QUICK_FILES and not item.get_closest_marker("slow")
        if in_quick_file or item.nodeid.endswith(QUICK_END_TO_END):
            item.add_marker(pytest.mark.quick)
