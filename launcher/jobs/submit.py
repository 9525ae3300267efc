"""``heft submit``: check a config, render an sbatch script from ``slurm/heft.sbatch.j2``, submit it.

Everything that can be checked without the cluster is checked here, before the job waits in the
queue: the config and the layout for ``nodes x processes``, the data, the run directory (and, for
a sweep, each override set). The script is written to ``RUN_DIR/slurm/heft.sbatch`` (so the run
directory keeps the exact job that produced it), the job's stdout/stderr go next to it, and
``RUN_DIR/slurm/job.json`` records the job id for ``heft status``.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from heft.launcher.config import ConfigError
from heft.launcher.jobs import slurm

TEMPLATE = "heft.sbatch.j2"
SCRIPT_NAME = "heft.sbatch"


class SubmitError(ConfigError):
    """The job cannot be submitted as asked; the message names the fix."""


@dataclass
class SubmitOptions:
    nodes: int = 1
    """Nodes of the allocation; one ``heft train`` per node, DP (and PP) spanning them."""
    gpus_per_node: int = 0
    """GPUs per node (0: CPU nodes, gloo). Also the workers per node unless procs_per_node is set."""
    procs_per_node: int | None = None
    """Workers per node (default: gpus_per_node, or on CPU nodes the config's world size / nodes)."""
    time: str = "01:00:00"
    """Slurm time limit (its formats: MM, HH:MM:SS, D-HH:MM)."""
    grace_s: int = 300
    """Seconds before the time limit at which the run is told to save and stop (--signal)."""
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    exclusive: bool = False
    dependency: str | None = None
    """Passed to sbatch --dependency, e.g. afterok:123 (train after a prepare job)."""
    max_requeues: int = 20
    max_parallel: int | None = None
    """A sweep's array indices running at once (sbatch --array=0-N%K; None: as many as fit)."""
    job_name: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    """Further ``#SBATCH`` lines, e.g. ``--qos=high``."""
    env: list[str] = field(default_factory=list)
    """KEY=VALUE exported in the job (e.g. NCCL_SOCKET_IFNAME=ib0)."""


@dataclass
class Member:
    """One training run of the job: the whole job, or one array index of a sweep."""

    overrides: list[str]
    run_dir: Path
    procs_per_node: int


def heft_executable() -> str:
    """The ``heft`` of this installation, so the job runs the same heft as the submitting shell."""
    beside = Path(sys.executable).with_name("heft")
    return str(beside) if beside.exists() else (shutil.which("heft") or "heft")


def slurm_time_seconds(text: str) -> int:
    """Seconds of a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = clock.split(":")
    try:
        if not days.isdigit() or not all(p.isdigit() for p in parts) or len(parts) > 3:
            raise ValueError
        numbers = [int(p) for p in parts]
    except ValueError:
        raise SubmitError(f"--time {text!r} is not a Slurm time limit; use MM, HH:MM:SS or "
                          f"D-HH:MM:SS (e.g. 90, 04:00:00, 2-00:00:00)") from None
    if "-" in text:  # D-HH, D-HH:MM, D-HH:MM:SS
        numbers += [0] * (3 - len(numbers))
        hours, minutes, seconds = numbers
    elif len(numbers) == 3:
        hours, minutes, seconds = numbers
    else:  # MM or MM:SS
        hours, (minutes, seconds) = 0, (numbers + [0])[:2]
    return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds


def check_time(options: SubmitOptions) -> None:
    limit = slurm_time_seconds(options.time)
    if limit <= 0:
        raise SubmitError(f"--time {options.time} must be positive")
    if options.grace_s >= limit:
        raise SubmitError(
            f"--grace {options.grace_s} s is not shorter than --time {options.time} ({limit} s): the "
            f"run would be told to stop as soon as it starts and requeue again and again; give a "
            f"longer --time or a shorter --grace")


# What each option may hold where Slurm has a syntax for it. Every value in the script is also
# refused when it holds a control character: a newline in an #SBATCH line ends the header (sbatch
# stops reading #SBATCH lines there) and makes the rest a shell command.
SLURM_OPTION_PATTERNS = {
    "--job-name": (r"[\w.@+:%=/-]{1,200}", "letters, digits and . _ - + : @ % = /"),
    "--partition": (r"[\w.-]+(,[\w.-]+)*", "a partition name, or several separated by commas"),
    "--account": (r"[\w.-]+", "an account name: letters, digits, . _ -"),
    "--mem": (r"\d+([KMGT]B?)?", "a size such as 200G, 64000M or 0"),
    "--dependency": (r"[\w:,?+%*-]+", "a Slurm dependency list such as afterok:1234"),
}


def _has_control_character(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def check_script_values(options: SubmitOptions, paths: dict[str, Path]) -> None:
    """Refuse, in one line and before anything is written, a value that could change the batch
    script's meaning: a control character anywhere (an option, an --sbatch-arg, an --env value, a
    path written into the script), or an option that does not match Slurm's syntax for it."""
    import re

    values = {"--job-name": options.job_name, "--partition": options.partition,
              "--account": options.account, "--mem": options.mem, "--dependency": options.dependency}
    for option, value in values.items():
        if value is None:
            continue
        pattern, what = SLURM_OPTION_PATTERNS[option]
        if _has_control_character(value) or not re.fullmatch(pattern, value):
            raise SubmitError(f"{option} {value!r} is not a valid value: it takes {what}")
    for line in options.sbatch_args:
        if _has_control_character(line) or not line.startswith("-"):
            raise SubmitError(f"--sbatch-arg {line!r} must be one sbatch option (starting with -) on "
                              f"one line, e.g. --sbatch-arg=--qos=high")
    for item in options.env:
        if _has_control_character(item):
            raise SubmitError(f"--env {item!r} holds a control character (a newline?); give one line")
    for what, path in paths.items():
        check_path_for_script(what, path)


def check_path_for_script(what: str, path: str | Path) -> None:
    if _has_control_character(str(path)):
        raise SubmitError(f"{what} {str(path)!r} holds a control character (a newline?), which "
                          f"cannot go into a batch script; rename it")


def procs_per_node(options: SubmitOptions, cfg) -> int:
    if options.procs_per_node:
        return options.procs_per_node
    if options.gpus_per_node:
        return options.gpus_per_node
    world = cfg.parallel.model_parallel_size() * (cfg.parallel.data or 1)
    if world % options.nodes:
        raise SubmitError(
            f"the config runs {world} processes (TP*PP*CP*DP), which do not split over --nodes "
            f"{options.nodes}; set parallel.data or --procs-per-node")
    return world // options.nodes


def read_sweep(path: str) -> list[list[str]]:
    """A sweep file: one override set per line (``key=value key=value``); # starts a comment."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise SubmitError(f"--sweep {path}: {exc.strerror or exc}") from None
    sets = []
    for number, line in enumerate(lines, start=1):
        overrides = shlex.split(line, comments=True)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise SubmitError(f"--sweep {path} line {number}: {bad[0]!r} is not key=value")
        if overrides:
            sets.append(overrides)
    if not sets:
        raise SubmitError(f"--sweep {path} has no override sets (one line of key=value per array index)")
    return sets


def check_member(config: str, overrides: list[str], options: SubmitOptions) -> Member:
    """Load and check one override set as `heft train` would (preflight/checks.py). Returns it
    with an absolute run directory."""
    from heft.launcher.config import load_config, validate
    from heft.launcher.preflight.checks import check_before_launch

    cfg = load_config(config, overrides)
    validate(cfg, world_size=procs_per_node(options, cfg) * options.nodes)
    check_path_for_script("train.run_dir", Path(cfg.train.run_dir).resolve())  # before the checks create it
    refuse_if_job_active(Path(cfg.train.run_dir))
    finished = check_before_launch(cfg, verify_contents=False)  # the job's launcher reads the contents
    if finished:
        raise SubmitError(finished.removeprefix("heft: "))
    return Member(overrides=list(overrides), run_dir=Path(cfg.train.run_dir).resolve(),
                  procs_per_node=procs_per_node(options, cfg))


def refuse_if_job_active(run_dir: Path) -> None:
    """Two jobs training into one run directory would interleave checkpoints and metrics."""
    record = slurm.read_job_record(run_dir)
    job = slurm.scontrol_job(record["job_id"]) if record else None
    if job and job.get("JobState") in slurm.ACTIVE_STATES:
        raise SubmitError(
            f"{run_dir} belongs to job {record['job_id']}, still {job['JobState']}; wait for it, "
            f"`scancel {record['job_id']}` first, or choose a new train.run_dir")


def members(config: str, overrides: list[str], options: SubmitOptions,
            sweep: list[list[str]] | None) -> list[Member]:
    """The runs of this job, each checked. A sweep member without its own train.run_dir trains in
    RUN_DIR/sweep-<index>."""
    if not sweep:
        return [check_member(config, overrides, options)]
    from heft.launcher.config import load_config

    base_run_dir = Path(load_config(config, overrides).train.run_dir)
    checked = []
    for index, extra in enumerate(sweep):
        own = [o for o in extra if o.startswith("train.run_dir=")]
        run_dir = [] if own else [f"train.run_dir={base_run_dir / f'sweep-{index}'}"]
        try:
            checked.append(check_member(config, [*overrides, *run_dir, *extra], options))
        except ConfigError as exc:
            raise SubmitError(f"sweep set {index} (array index {index}: {' '.join(extra)}): {exc}") from None
    dirs = [m.run_dir for m in checked]
    if len(set(dirs)) != len(dirs):
        raise SubmitError("two sweep sets share a train.run_dir; give each its own or none")
    if len({m.procs_per_node for m in checked}) > 1:
        raise SubmitError("the sweep sets need different processes per node; one array job runs "
                          "one shape: submit them separately")
    return checked


def render(config: str, members: list[Member], options: SubmitOptions, home: Path, sweep: bool) -> str:
    """The batch script. ``home``: the run directory (a sweep's parent) that holds it and its logs."""
    import jinja2

    template_text = resources.files("heft.slurm").joinpath(TEMPLATE).read_text()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    env.filters["quote"] = lambda value: shlex.quote(str(value))
    extra_env = []
    for item in options.env:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SubmitError(f"--env {item!r} is not KEY=VALUE")
        extra_env.append((key, value))
    return env.from_string(template_text).render(
        rendered_at=time.strftime("%Y-%m-%d %H:%M:%S"),
        script_path=home / "slurm" / SCRIPT_NAME,
        job_name=options.job_name or f"heft-{home.name}",
        nodes=options.nodes, gpus_per_node=options.gpus_per_node,
        procs_per_node=members[0].procs_per_node,
        cpus_per_task=options.cpus_per_task, mem=options.mem, time=options.time,
        partition=options.partition, account=options.account, exclusive=options.exclusive,
        array=(f"0-{len(members) - 1}" + (f"%{options.max_parallel}" if options.max_parallel else ""))
        if sweep else None,
        grace_s=options.grace_s, workdir=Path.cwd(), log_dir=home / "slurm",
        log_name="%x-%A_%a" if sweep else "%x-%j", extra_sbatch=options.sbatch_args,
        heft=heft_executable(), config=Path(config).resolve(),
        sweep=[{"run_dir": m.run_dir, "overrides": m.overrides} for m in members] if sweep else None,
        run_dir=members[0].run_dir, overrides=members[0].overrides,
        env=extra_env, max_requeues=options.max_requeues,
    )


def sbatch(script: Path, options: SubmitOptions) -> str:
    """Submit; returns the job id."""
    command = ["sbatch", "--parsable"]
    if options.dependency:
        command.append(f"--dependency={options.dependency}")
    try:
        done = subprocess.run([*command, str(script)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SubmitError("sbatch not found: run heft submit on a Slurm login node (or use "
                          "--dry-run to see the script)") from None
    except subprocess.TimeoutExpired:
        raise SubmitError("sbatch did not answer in 60 s; is slurmctld reachable (try `sinfo`)?") from None
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise SubmitError(f"sbatch refused the job: {message[-1] if message else done.returncode} "
                          f"(script: {script})")
    return done.stdout.strip().split(";")[0]


def record_job(members: list[Member], job_id: str, script: Path, options: SubmitOptions,
               sweep: bool) -> None:
    for index, member in enumerate(members):
        record = {"job_id": f"{job_id}_{index}" if sweep else job_id,
                  "array_job_id": job_id if sweep else None, "script": str(script),
                  "submitted": time.time(), "nodes": options.nodes, "time": options.time,
                  "dependency": options.dependency, "overrides": member.overrides}
        directory = member.run_dir / "slurm"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / slurm.JOB_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def dirs_the_checks_create(config: str, overrides: list[str], sweep: list[list[str]] | None) -> list[Path]:
    """Run directories (and their missing parents) that the checks of a ``--dry-run`` would create;
    the dry run removes them again, empty, afterwards (:func:`remove_if_empty`)."""
    from heft.launcher.config import load_config

    run_dir = Path(load_config(config, overrides).train.run_dir).resolve()
    missing = [d for d in [run_dir, *[run_dir / f"sweep-{i}" for i in range(len(sweep or []))]]
               if not d.exists()]
    top = run_dir
    while not top.parent.exists():  # parents the checks would create too (runs/ of runs/x)
        top = top.parent
    return missing + ([top] if top != run_dir and not top.exists() else [])


def remove_if_empty(directory: Path) -> None:
    for path in sorted([directory, *directory.rglob("*")], key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()
        except OSError:
            pass
