"""The ``heft`` command.

    heft train CONFIG [key=value ...]     train; launches torchrun itself unless already a worker
    heft prepare --demo OUT               build the embedded demo corpus
    heft prepare --domain NAME=PATH[,PATH] ... --out OUT [--tokenizer byte|bpe]
    heft config CONFIG [key=value ...]    print the resolved, validated config
    heft plot RUN_DIR [--out FILE.png]    loss, per-domain loss/weight/fraction, ESS over steps

``heft --verbose ...`` shows every upstream warning and the launcher's own logs.
"""

from __future__ import annotations

import argparse
import os
import sys

from heft.launcher import output

output.filter_known_warnings()

import yaml  # noqa: E402


class UsageError(Exception):
    pass


def _check_before_launch(cfg) -> str | None:
    """Checks that need the data and the run directory but no processes, so a run that cannot work
    fails here in one line rather than in every worker. Returns a line to print instead of
    launching when the run directory's checkpoint already reached train.steps."""
    from heft.data.controllers import check_mixture
    from heft.data.loader import check_sequence_length, domain_proportions
    from heft.data.verify import check_enough_samples, verify_dataset
    from heft.launcher.rundir import already_finished, check_writable, decide_start

    manifest = verify_dataset(cfg.data.path)
    check_sequence_length(manifest, cfg.model.seq_length, cfg.data.path)
    weights = domain_proportions(manifest, cfg.data.proportions)
    check_enough_samples(manifest, weights, cfg.train.global_batch_size, cfg.data.path)
    check_mixture(cfg.mixture, [d["name"] for d in manifest["domains"]], cfg.data.path)
    check_writable(cfg.train.run_dir)
    return already_finished(cfg, decide_start(cfg, warn=lambda line: print(line, file=sys.stderr)))


def processes_per_node(args, cfg) -> int:
    if args.nproc_per_node:
        return args.nproc_per_node
    if args.nnodes > 1:
        raise UsageError("multi-node launches need --nproc-per-node (usually the GPUs per node)")
    return cfg.parallel.model_parallel_size() * (cfg.parallel.data or 1)


def torchrun_arguments(args, cfg) -> list[str]:
    from heft.launcher.launch import torchrun_arguments as build

    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    return build(processes_per_node(args, cfg), args.nnodes, args.rdzv_endpoint, args.rdzv_id,
                 args.node_rank, [args.config, *args.overrides])


def cmd_train(args) -> int:
    from heft.launcher.config import load_config, validate
    from heft.launcher.environment import prepare_worker_environment

    if prepare_worker_environment():
        from heft.launcher.worker import main as worker_main

        return worker_main([args.config, *args.overrides])
    cfg = load_config(args.config, args.overrides)
    validate(cfg, world_size=processes_per_node(args, cfg) * args.nnodes)
    from heft.launcher.train import check_backends
    from heft.model.build import Backends

    check_backends(cfg, Backends.detect())
    finished = _check_before_launch(cfg)
    if finished:
        print(finished)
        return 0
    from heft.launcher.launch import run_workers

    return run_workers(torchrun_arguments(args, cfg), processes_per_node(args, cfg) * args.nnodes,
                       verbose=output.verbose())


def cmd_prepare(args) -> int:
    from heft.data.prepare import prepare, read_documents

    if bool(args.demo) == bool(args.domain):
        raise UsageError("give either --demo OUT or one or more --domain NAME=PATH[,PATH] with --out")
    if args.demo:
        from heft.data.demo_corpus import demo_documents

        domains, out = demo_documents(), args.demo
    else:
        if not args.out:
            raise UsageError("--domain needs --out DIR")
        domains = {}
        for spec in args.domain:
            name, sep, paths = spec.partition("=")
            if not sep or not name or not paths:
                raise UsageError(f"--domain {spec!r} is not NAME=PATH[,PATH...]")
            domains[name] = read_documents(paths.split(","))
        out = args.out
    manifest = prepare(domains, out, tokenizer=args.tokenizer, seq_length=args.seq_length,
                       bpe_vocab_size=args.vocab_size, val_fraction=args.val_fraction)
    for d in manifest["domains"]:
        print(f"{d['name']:>12}: {d['documents']} documents -> {d['train']['samples']} train / "
              f"{d['val']['samples']} val samples of {manifest['seq_length'] + 1} tokens")
    print(f"wrote {out} (tokenizer {manifest['tokenizer']['kind']}, vocab {manifest['tokenizer']['vocab_size']})")
    return 0


def cmd_config(args) -> int:
    from heft.launcher.config import load_config

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")
    return 0


def cmd_plot(args) -> int:
    from heft.launcher.plot import plot_run

    try:
        out = plot_run(args.run_dir, args.out)
    except ValueError as exc:  # a damaged or empty metrics.jsonl
        raise UsageError(str(exc)) from None
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heft", description="Megatron-style pretraining with loss-based reweighting")
    parser.add_argument("--verbose", action="store_true",
                        help="show every upstream warning and the launcher's logs")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (launches torchrun unless already a worker)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tensor=2")
    train.add_argument("--nproc-per-node", type=int, default=None,
                       help="processes on this node (default: TP*PP*CP*DP of the config)")
    train.add_argument("--nnodes", type=int, default=1)
    train.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT for multi-node rendezvous")
    train.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show every upstream warning and the launcher's logs")
    train.add_argument("--node-rank", type=int, default=None, help="this node's rank (multi-node)")
    train.add_argument("--rdzv-id", default="heft")
    train.set_defaults(func=cmd_train)

    prep = sub.add_parser("prepare", help="tokenize and pack text into per-domain MDS datasets")
    prep.add_argument("--demo", metavar="OUT", help="build the embedded demo corpus into OUT")
    prep.add_argument("--domain", action="append", metavar="NAME=PATH[,PATH]",
                      help="a domain and its .txt/.jsonl files or directories (repeatable)")
    prep.add_argument("--out", help="output directory (with --domain)")
    prep.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    prep.add_argument("--seq-length", type=int, default=128)
    prep.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    prep.add_argument("--val-fraction", type=float, default=0.02)
    prep.set_defaults(func=cmd_prepare)

    show = sub.add_parser("config", help="print the resolved, validated config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(func=cmd_config)

    plot = sub.add_parser("plot", help="plot a run's loss, per-domain loss, weights and ESS")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/plots.png)")
    plot.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    from heft.data.config import DataConfigError
    from heft.launcher.config import ConfigError
    
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[output.VERBOSE_VAR] = "1"  # the workers inherit it
    try:
        return args.func(args) or 0
    except (ConfigError, DataConfigError, UsageError, FileNotFoundError,
            FileExistsError, PermissionError) as exc:
        print(f"heft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("heft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
