"""The ``heft`` command.

    heft train CONFIG [key=value ...]     train; launches torchrun itself unless already a worker
    heft prepare --demo OUT               build the embedded demo corpus
    heft prepare --domain NAME=PATH[,PATH] ... --out OUT [--tokenizer byte|bpe]
    heft config CONFIG [key=value ...]    print the resolved, validated config
    heft plot RUN_DIR [--out FILE.png]    loss, per-domain loss/weight/fraction, ESS over steps
    heft submit CONFIG --nodes N [...]    check the config, render an sbatch script, submit it
    heft status RUN_DIR                   state, step, loss, speed, ETA, checkpoint, requeues
    heft eval RUN_DIR_OR_CKPT [...]       held-out loss and perplexity per domain, any layout
    heft export-hf CKPT OUT               a Hugging Face Llama directory (safetensors + tokenizer)
    heft generate CKPT --prompt TEXT      sample a continuation
    heft lm-eval --model heft ...         lm-evaluation-harness with heft checkpoints (heft[eval])

``heft --verbose ...`` shows every upstream warning and the launcher's own logs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from heft.launcher.launch import known_warnings

known_warnings.filter_known_warnings()

import yaml  # noqa: E402

from heft.launcher.launch.reporting import USER_ERRORS, UserError  # noqa: E402


class UsageError(UserError):
    """The command line cannot work as given."""


def processes_per_node(args, cfg) -> int:
    if args.nproc_per_node:
        return args.nproc_per_node
    if args.nnodes > 1:
        raise UsageError("multi-node launches need --nproc-per-node (usually the GPUs per node)")
    return cfg.parallel.model_parallel_size() * (cfg.parallel.data or 1)


def train_launch_arguments(args, cfg) -> list[str]:
    """The torchrun arguments ``heft train``'s options ask for on this node."""
    from heft.launcher.launch.agent import torchrun_arguments

    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    return torchrun_arguments(processes_per_node(args, cfg), args.nnodes, args.rdzv_endpoint, args.rdzv_id,
                              args.node_rank, [args.config, *args.overrides])


def cmd_train(args) -> int:
    from heft.launcher.config import load_config, validate
    from heft.launcher.launch.environment import prepare_worker_environment
    from heft.launcher.launch.stop import hold_stop_signals

    # With --rdzv-endpoint this process launches its node's workers, also inside an srun task (one
    # task per node, as `heft submit` runs it); otherwise an srun task is itself a worker.
    if not args.rdzv_endpoint and prepare_worker_environment():
        from heft.launcher.worker import main as worker_main

        return worker_main([args.config, *args.overrides])
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    stop_request = hold_stop_signals()
    if args.nnodes > 1 and args.node_rank is None and "SLURM_NODEID" in os.environ:
        args.node_rank = int(os.environ["SLURM_NODEID"])
    cfg = load_config(args.config, args.overrides)
    world_size = processes_per_node(args, cfg) * args.nnodes
    validate(cfg, world_size=world_size)
    from heft.launcher.preflight.checks import check_backends, check_before_launch
    from heft.model.build import Backends

    check_backends(cfg, Backends.detect())
    finished = check_before_launch(cfg, verify_contents=not args.node_rank)  # node 0 reads contents once
    if finished:
        print(finished)
        return 0
    if stop_request:
        print(f"heft: {stop_request[0].name} received before the workers started; nothing new to "
              f"save, exiting with status 75 so the job can be requeued", file=sys.stderr)
        return 75
    return _launch_training(args, cfg, world_size)


def _launch_training(args, cfg, world_size: int) -> int:
    """Run this node's workers; node 0 keeps the run's state file and the stop file."""
    from heft.launcher.checkpoint.start import rerun_hint
    from heft.launcher.launch import runstate
    from heft.launcher.launch.agent import run_workers
    from heft.launcher.launch.stop import stop_file

    node0 = not args.node_rank
    stop_path = stop_file(cfg.train.run_dir)
    if node0 and "SLURM_JOB_ID" not in os.environ:
        stop_path.unlink(missing_ok=True)  # left from an earlier run (under Slurm: job-event's job)
    state = runstate.RunStateFile(cfg, world_size, args.nnodes, enabled=node0)
    state.started()
    printed: list[str] = []
    status = run_workers(train_launch_arguments(args, cfg), world_size, verbose=known_warnings.verbose(),
                         printed=printed, stop_path=stop_path, after_ctrl_c=lambda: rerun_hint(cfg))
    if node0 and status == 75:
        stop_path.unlink(missing_ok=True)  # honoured
    state.ended(status, printed)
    return status


def cmd_prepare(args) -> int:
    from heft.data.prepare import PrepareOptions, prepare, prepare_files
    from heft.data.sources import BadRecord, ReadOptions

    sources = [bool(args.demo), bool(args.domain), bool(args.input)]
    if sum(sources) != 1:
        raise UsageError("give one of --demo OUT, --domain NAME=PATH[,PATH] ... --out OUT, or "
                         "--input PATH ... --domain-field FIELD --out OUT")
    if bool(args.input) != bool(args.domain_field):
        raise UsageError("--input goes with --domain-field (each record names its domain); otherwise "
                         "use --domain NAME=PATH")
    options = PrepareOptions(tokenizer=args.tokenizer, seq_length=args.seq_length,
                             bpe_vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                             workers=args.workers,
                             read=ReadOptions(text_field=args.text_field, domain_field=args.domain_field,
                                              skip_bad=args.skip_bad_records))
    try:
        options.check()
        if args.demo:
            from heft.data.demo_corpus import demo_documents

            out = args.demo
            manifest = prepare(demo_documents(), out, tokenizer=args.tokenizer, seq_length=args.seq_length,
                               bpe_vocab_size=args.vocab_size, val_fraction=args.val_fraction)
        else:
            if not args.out:
                raise UsageError("--domain / --input need --out DIR")
            out = args.out
            domains: dict[str, list[str]] = {}
            for spec in args.domain or []:
                name, sep, paths = spec.partition("=")
                if not sep or not name or not paths:
                    raise UsageError(f"--domain {spec!r} is not NAME=PATH[,PATH...]")
                if name in domains:
                    raise UsageError(f"--domain {name} is given twice; give its inputs once, "
                                     f"separated by commas: --domain {name}=PATH1,PATH2")
                domains[name] = paths.split(",")
            if args.input:
                domains = {"inputs": list(args.input)}
            manifest = prepare_files(domains, Path(out), options)
    except (BadRecord, ValueError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(str(exc)) from None
    for d in manifest["domains"]:
        print(f"{d['name']:>12}: {d['documents']} documents -> {d['train']['samples']} train / "
              f"{d['val']['samples']} val samples of {manifest['seq_length'] + 1} tokens")
    for reason, count in manifest.get("skipped_records", {}).items():
        print(f"heft: skipped {count} record(s): {reason}")
    unsupported = manifest.get("unsupported_files", [])
    if unsupported:
        print(f"heft: did not read {len(unsupported)} file(s) of other types in the input directories: "
              f"{', '.join(unsupported[:5])}{', ...' if len(unsupported) > 5 else ''} (the manifest lists them)")
    print(f"wrote {out} (tokenizer {manifest['tokenizer']['kind']}, vocab {manifest['tokenizer']['vocab_size']})")
    return 0


def cmd_config(args) -> int:
    from heft.launcher.config import load_config

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
    return 0


def cmd_plan(args) -> int:
    from heft.launcher.preflight import plan

    return plan.main(args.config, args.overrides, args.gpus, args.gpu_memory)


def cmd_plot(args) -> int:
    from heft.launcher.metrics.plot import plot_run

    try:
        out = plot_run(args.run_dir, args.out)
    except ValueError as exc:  # a damaged or empty metrics.jsonl
        raise UsageError(str(exc)) from None
    print(f"wrote {out}")
    return 0


def cmd_eval(args) -> int:
    from heft.launcher.evaluate.heldout import EVAL_FLAG, EvalPlan
    from heft.launcher.launch.agent import run_workers, torchrun_arguments

    p = EvalPlan.from_command(args.checkpoint, args.data, args.nproc, args.micro_batch_size,
                              args.max_batches, args.overrides)
    return run_workers(torchrun_arguments(p.world_size, 1, None, "heft-eval", None,
                                          [EVAL_FLAG, str(p.checkpoint), *p.overrides]),
                       p.world_size, verbose=known_warnings.verbose())


def cmd_export_hf(args) -> int:
    from heft.launcher.checkpoint.export_hf import export
    from heft.launcher.checkpoint.files import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    out = export(checkpoint, Path(args.out))
    print(f"heft: exported {checkpoint} to {out}; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_generate(args) -> int:
    from heft.launcher.evaluate.generate import Sampling, print_continuation
    from heft.launcher.evaluate.inference import LoadedModel

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.seed)
    try:
        sampling.check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model = LoadedModel(args.checkpoint, precision=args.precision)
    prompt = model.tokenizer.encode(args.prompt)
    if not prompt:
        raise UsageError("--prompt is empty")
    if len(prompt) + sampling.max_new_tokens > model.seq_length:
        print(f"heft: note: prompt + {sampling.max_new_tokens} new tokens exceed the model's context of "
              f"{model.seq_length} tokens; each step sees the last {model.seq_length}", file=sys.stderr)
    print_continuation(model, args.prompt, prompt, sampling)
    model.close()
    return 0


def cmd_lm_eval(args) -> int:
    try:
        from heft.launcher.evaluate import lm_eval_model
    except ImportError as exc:
        raise UsageError(f"heft lm-eval needs lm-evaluation-harness ({exc}); "
                         f"pip install 'heft[eval]'") from None
    return lm_eval_model.main(args.lm_eval_args)


def cmd_submit(args) -> int:
    from heft.launcher.jobs import submit

    options = submit.SubmitOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
        time=args.time, grace_s=args.grace, partition=args.partition, account=args.account,
        cpus_per_task=args.cpus_per_task, mem=args.mem, exclusive=args.exclusive,
        dependency=args.dependency, max_requeues=args.max_requeues, job_name=args.job_name,
        max_parallel=args.max_parallel,
        sbatch_args=args.sbatch_arg or [], env=args.env or [])
    if options.nodes < 1 or options.grace_s < 0 or options.max_requeues < 0:
        raise UsageError("--nodes must be >= 1, --grace and --max-requeues >= 0")
    submit.check_time(options)
    # Before anything is checked or made: values that would change the batch script's meaning.
    submit.check_script_values(options, {"the config path": Path(args.config).resolve(),
                                         "the working directory": Path.cwd()})
    sweep = submit.read_sweep(args.sweep) if args.sweep else None
    created = submit.dirs_the_checks_create(args.config, args.overrides, sweep) if args.dry_run else []
    members = submit.members(args.config, args.overrides, options, sweep)
    home = members[0].run_dir  # holds the script and the job's logs; a sweep's parent directory
    if sweep:
        from heft.launcher.config import load_config

        home = Path(load_config(args.config, args.overrides).train.run_dir).resolve()
    script_text = submit.render(args.config, members, options, home, sweep=bool(sweep))
    if args.dry_run:
        for directory in created:  # the checks made them; a dry run leaves nothing behind
            submit.remove_if_empty(directory)
        print(script_text, end="")
        return 0
    script = home / "slurm" / submit.SCRIPT_NAME
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(script_text)
    job_id = submit.sbatch(script, options)
    submit.record_job(members, job_id, script, options, sweep=bool(sweep))
    what = f"array job {job_id} ({len(members)} runs: {home}/sweep-*)" if sweep else f"job {job_id}"
    print(f"heft: submitted {what}; script {script}; logs in {script.parent}; "
          f"follow it with `heft status {members[0].run_dir}`")
    return 0


def cmd_status(args) -> int:
    from heft.launcher.jobs.status import collect, format_status

    print(format_status(collect(args.run_dir)))
    return 0


def cmd_job_event(args) -> int:
    """Called by the batch script heft submit renders (slurm/heft.sbatch.j2), not by people."""
    from heft.launcher.jobs import requeue

    if args.event == "start":
        requeue.record_start(args.run_dir)
        return 0
    if args.status is None:
        raise UsageError("job-event end needs --status")
    again, line = requeue.record_end(args.run_dir, args.status, args.max_requeues, args.terminated)
    print(line, file=sys.stderr, flush=True)
    return 0 if again else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heft", description="Megatron-style pretraining with loss-based reweighting")
    parser.add_argument("--verbose", action="store_true",
                        help="show every upstream warning and the launcher's logs")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{train,prepare,config,plot,submit,status,eval,export-hf,generate,lm-eval}")
    _add_train_parser(sub)
    _add_prepare_parser(sub)
    _add_config_parser(sub)
    _add_plan_parser(sub)
    _add_plot_parser(sub)
    _add_submit_parser(sub)
    _add_status_parser(sub)
    _add_eval_parser(sub)
    _add_export_hf_parser(sub)
    _add_generate_parser(sub)
    _add_lm_eval_parser(sub)
    _add_job_event_parser(sub)
    return parser


def _add_train_parser(sub) -> None:
    command = sub.add_parser("train", help="train a model (launches torchrun unless already a worker)")
    command.add_argument("config")
    command.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tensor=2")
    command.add_argument("--nproc-per-node", type=int, default=None,
                         help="processes on this node (default: TP*PP*CP*DP of the config)")
    command.add_argument("--nnodes", type=int, default=1)
    command.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT for multi-node rendezvous")
    command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="show every upstream warning and the launcher's logs")
    command.add_argument("--node-rank", type=int, default=None, help="this node's rank (multi-node)")
    command.add_argument("--rdzv-id", default="heft")
    command.set_defaults(func=cmd_train)


def _add_prepare_parser(sub) -> None:
    command = sub.add_parser("prepare", help="tokenize and pack text into per-domain MDS datasets")
    command.add_argument("--demo", metavar="OUT", help="build the embedded demo corpus into OUT")
    command.add_argument("--domain", action="append", metavar="NAME=PATH[,PATH]",
                         help="a domain and its files, directories or globs of .txt, .jsonl, .jsonl.gz, "
                         ".jsonl.zst, .parquet (repeatable)")
    command.add_argument("--input", action="append", metavar="PATH",
                         help="with --domain-field: files, directories or globs whose records name their domain")
    command.add_argument("--domain-field", help="record field naming the domain, e.g. meta.redpajama_set_name")
    command.add_argument("--text-field", default="text", help="record field holding the text (default text)")
    command.add_argument("--out", help="output directory (new, empty, or an earlier heft dataset)")
    command.add_argument("--tokenizer", default="byte",
                         help="byte, bpe (trained on the corpus), or a tokenizer.json / Hugging Face "
                         "tokenizer directory (default byte)")
    command.add_argument("--seq-length", type=int, default=128)
    command.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    command.add_argument("--val-fraction", type=float, default=0.02,
                         help="share of documents held out, chosen by a hash of each document")
    command.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: all cores)")
    command.add_argument("--skip-bad-records", action="store_true",
                         help="count and skip malformed records instead of stopping at the first")
    command.set_defaults(func=cmd_prepare)


def _add_config_parser(sub) -> None:
    command = sub.add_parser("config", help="print the resolved, validated config")
    command.add_argument("config")
    command.add_argument("overrides", nargs="*")
    command.set_defaults(func=cmd_config)


def _add_plan_parser(sub) -> None:
    command = sub.add_parser("plan", help="estimate per-GPU memory and FLOPs of a layout: does it fit, "
                                          "and the largest micro batch that does (exit 1 if not)")
    command.add_argument("config")
    command.add_argument("overrides", nargs="*")
    command.add_argument("--gpus", type=int, help="processes in the job (default: parallel.data x "
                         "TP x PP x CP, or one data-parallel replica)")
    command.add_argument("--gpu-memory", type=float, metavar="GB",
                         help="memory per GPU in GiB, as nvidia-smi shows it (80 for an 80 GB H100, 141 "
                              "for an H200); default: this machine's GPU, or its host memory without one")
    command.set_defaults(func=cmd_plan)


def _add_plot_parser(sub) -> None:
    command = sub.add_parser("plot", help="plot a run's loss, per-domain loss, weights and ESS")
    command.add_argument("run_dir")
    command.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/plots.png)")
    command.set_defaults(func=cmd_plot)


def _add_submit_parser(sub) -> None:
    command = sub.add_parser("submit", help="check a config, render an sbatch script and submit it to Slurm",
                             description="Checks the config, data and run directory as `heft train` "
                             "would, renders slurm/heft.sbatch.j2 into RUN_DIR/slurm/heft.sbatch and "
                             "submits it: one `heft train` per node, c10d rendezvous on the first node, "
                             "save on a preemption or --grace seconds before the time limit, requeue, "
                             "resume.")
    command.add_argument("config")
    command.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for heft train")
    command.add_argument("--nodes", type=int, default=1)
    command.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU nodes (gloo)")
    command.add_argument("--procs-per-node", type=int, default=None,
                         help="workers per node (default: --gpus-per-node, or world size / nodes)")
    command.add_argument("--time", default="01:00:00", help="time limit (default 01:00:00)")
    command.add_argument("--grace", type=int, default=300,
                         help="seconds before the time limit at which the run saves and stops (default 300)")
    command.add_argument("--partition")
    command.add_argument("--account")
    command.add_argument("--cpus-per-task", type=int, help="cores per node for heft's task")
    command.add_argument("--mem", help="memory per node, e.g. 200G")
    command.add_argument("--exclusive", action="store_true")
    command.add_argument("--dependency", help="sbatch --dependency, e.g. afterok:1234")
    command.add_argument("--sweep", metavar="FILE",
                         help="a job array: one line of key=value overrides per array index")
    command.add_argument("--max-parallel", type=int, default=None,
                         help="with --sweep: array indices running at once (default: as many as fit)")
    command.add_argument("--max-requeues", type=int, default=20,
                         help="stop requeueing after this many (default 20)")
    command.add_argument("--job-name")
    command.add_argument("--sbatch-arg", action="append", metavar="ARG",
                         help="a further #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)")
    command.add_argument("--env", action="append", metavar="KEY=VALUE",
                         help="export in the job, e.g. NCCL_SOCKET_IFNAME=ib0 (repeatable)")
    command.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    command.set_defaults(func=cmd_submit)


def _add_status_parser(sub) -> None:
    command = sub.add_parser("status", help="where a run stands: state, step, loss, speed, ETA, checkpoint")
    command.add_argument("run_dir")
    command.set_defaults(func=cmd_status)


def _add_eval_parser(sub) -> None:
    command = sub.add_parser("eval", help="held-out loss and perplexity per domain of a checkpoint",
                             description="Loads a checkpoint (or a run directory's newest) under any layout "
                             "the processes fit (default: one process), evaluates every domain's validation "
                             "split, prints a table and writes CHECKPOINT.eval.json beside it.")
    command.add_argument("checkpoint", help="a checkpoint directory or a run directory")
    command.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tensor=2")
    command.add_argument("--data", help="a prepared dataset (default: the one the checkpoint trained on)")
    command.add_argument("--nproc", type=int, help="processes (default: TP*PP*CP of the overrides, i.e. 1)")
    command.add_argument("--micro-batch-size", type=int, help="default: the training run's")
    command.add_argument("--max-batches", type=int,
                         help="validation microbatches of each domain per data-parallel replica (default: all)")
    command.set_defaults(func=cmd_eval)


def _add_export_hf_parser(sub) -> None:
    command = sub.add_parser("export-hf", help="write a Hugging Face Llama directory from a checkpoint")
    command.add_argument("checkpoint", help="a checkpoint directory or a run directory")
    command.add_argument("out", help="output directory (new, or an earlier heft export)")
    command.set_defaults(func=cmd_export_hf)


def _add_generate_parser(sub) -> None:
    command = sub.add_parser("generate", help="sample a continuation of a prompt from a checkpoint")
    command.add_argument("checkpoint", help="a checkpoint directory or a run directory")
    command.add_argument("--prompt", required=True)
    command.add_argument("--max-new-tokens", type=int, default=100)
    command.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    command.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    command.set_defaults(func=cmd_generate)


def _add_lm_eval_parser(sub) -> None:
    command = sub.add_parser("lm-eval", help="lm-evaluation-harness's command with the heft model registered",
                             add_help=False)
    command.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    command.set_defaults(func=cmd_lm_eval)


def _add_job_event_parser(sub) -> None:
    command = sub.add_parser("job-event")  # the batch script's bookkeeping; not listed in the help
    command.add_argument("event", choices=["start", "end"])
    command.add_argument("run_dir")
    command.add_argument("--status", type=int)
    command.add_argument("--max-requeues", type=int, default=20)
    command.add_argument("--terminated", action="store_true", help="the batch script got SIGTERM")
    command.set_defaults(func=cmd_job_event)


def _lm_eval_arguments(argv: list[str]) -> list[str] | None:
    """What follows ``heft [--verbose] lm-eval``, or None for any other command."""
    for i, arg in enumerate(argv):
        if arg == "lm-eval":
            return argv[i + 1:]
        if arg != "--verbose":
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = _lm_eval_arguments(argv)
    if passed_on is not None:  # all of them are lm-eval's, options first: argparse would take them
        argv = argv[:len(argv) - len(passed_on)]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if passed_on is not None:
        args.lm_eval_args = passed_on
    if extra:  # key=value overrides after the options (`heft submit C --nodes 2 train.steps=9`)
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.verbose:
        os.environ[known_warnings.VERBOSE_VAR] = "1"  # the workers inherit it
    try:
        return args.func(args) or 0
    except USER_ERRORS as exc:
        print(f"heft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("heft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `heft status RUN | head`: the reader has gone; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
        return 141  # as a process SIGPIPE ended


def run() -> None:
    """The `heft` command: :func:`main`, then the process ends without tearing its modules down
    (``launch/process_exit.py``; 0.75 s after a command that imported torch)."""
    from heft.launcher.launch.process_exit import end_process

    code = main()
    end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
