"""The checks a run passes before any worker starts: one sequence, used by ``heft train`` and
``heft submit`` before launching, and (its data part) by every worker again, since a worker started
by srun or a bare torchrun has had nobody check for it.

Each check fails in one line naming the problem and the fix (a UserError: exit status 2), so a run
that cannot work never reaches a process group, where it would fail once per rank or hang.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from heft.launcher.config import ConfigError

if TYPE_CHECKING:
    from heft.launcher.config import HeftConfig
    from heft.model.build import Backends


@dataclass
class CheckedData:
    """What the data checks learnt, for the worker that goes on to build from it."""

    manifest: dict
    """The prepared dataset's manifest.json."""
    domain_names: list[str]
    mixture_reference: object
    """The reference mixture an online controller steers against (data.controllers.check_mixture)."""


def check_backends(cfg: HeftConfig, backends: Backends) -> None:
    """The layout and attention need kernels this machine has (sequence parallelism needs TE or
    apex norms, ...). Only where the workers run: a login node's kernels say nothing of the job's."""
    from heft.model.build import check_backend_support

    try:
        check_backend_support(cfg.parallel, backends, cfg.train.attention)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_data(cfg: HeftConfig) -> CheckedData:
    """The dataset is complete and fits the config: sequence length, enough samples for one global
    batch, a mixture over its domains, held-out samples when the run evaluates."""
    from heft.data.controllers import check_mixture
    from heft.data.loader import check_has_validation, check_sequence_length, domain_proportions
    from heft.data.verify import check_enough_samples, verify_dataset

    manifest = verify_dataset(cfg.data.path)
    check_sequence_length(manifest, cfg.model.seq_length, cfg.data.path)
    check_enough_samples(manifest, domain_proportions(manifest, cfg.data.proportions),
                         cfg.train.global_batch_size, cfg.data.path)
    domain_names = [d["name"] for d in manifest["domains"]]
    reference = check_mixture(cfg.mixture, domain_names, cfg.data.path)
    if cfg.train.eval_interval or cfg.train.eval_at_end:
        check_has_validation(manifest, cfg.data.path)
    return CheckedData(manifest=manifest, domain_names=domain_names, mixture_reference=reference)


def check_hf_init(cfg: HeftConfig, manifest: dict) -> None:
    """checkpoint.init_hf names a Hugging Face Llama of the configured shape and the data's tokenizer."""
    if not cfg.checkpoint.init_hf:
        return
    from heft.data.tokenizer import load_tokenizer
    from heft.model.hf_import import HFImportError, check_fits

    try:
        check_fits(cfg.checkpoint.init_hf, cfg.model, load_tokenizer(cfg.data.path, manifest["tokenizer"]))
    except HFImportError as exc:
        raise ConfigError(str(exc)) from None


def check_before_launch(cfg: HeftConfig, verify_contents: bool = True) -> str | None:
    """Everything that needs the data and the run directory but no process (the config itself is
    validated by the caller, for its own world size). Returns the line to print instead of
    launching when the run directory's checkpoint already reached train.steps. The checkpoint the
    run will start from, verified here with its contents (``verify_contents``: by node 0's launcher
    only, never by `heft submit` on a login node), is handed to the workers the launch starts
    (VERIFIED_START_VAR), which then need not read it all again."""
    import os

    from heft.launcher.checkpoint.start import VERIFIED_START_VAR, already_finished, check_writable, decide_start

    from heft.launcher.launch.run_lock import check_free

    checked = check_data(cfg)
    check_hf_init(cfg, checked.manifest)
    check_writable(cfg.train.run_dir)
    check_free(cfg.train.run_dir)  # another run in this directory: refused before it is touched
    start = decide_start(cfg, warn=lambda line: print(line, file=sys.stderr), contents=verify_contents)
    if verify_contents:
        os.environ[VERIFIED_START_VAR] = start.checkpoint or ""
    else:
        os.environ.pop(VERIFIED_START_VAR, None)
    return already_finished(cfg, start)
