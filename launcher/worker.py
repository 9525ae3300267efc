"""Worker entry point: ``python -m launcher.worker CONFIG [key=value ...]`` under torchrun or srun."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from data.loader import DataConfigError
    from launcher.config import ConfigError, load_config
    from launcher.environment import prepare_worker_environment
    from launcher.train import NonFiniteLossError, train

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m launcher.worker CONFIG [key=value ...]", file=sys.stderr)
        return 2
    if not prepare_worker_environment():
        print("launcher.worker must run under torchrun or srun; use `heft train` instead",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(argv[0], argv[1:])
        train(cfg)
    except (ConfigError, DataConfigError, FileNotFoundError) as exc:
        print(f"heft: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"heft: stopped: {exc}", file=sys.stderr)
        return 1
    return 0


# The guard matters: dist_checkpointing and streaming spawn helpers that re-import __main__.
if __name__ == "__main__":
    sys.exit(main())
