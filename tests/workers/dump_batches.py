"""torchrun worker: build heft's process groups and data iterator, dump what this rank receives."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    from heft.launcher.config import load_config
    from heft.launcher.train.build import replica_batches
    from heft.model import cpu_compat
    from heft.launcher.train.build import start_processes
    from heft.model.parallel import shutdown

    out_dir, steps, config, *overrides = sys.argv[1:]
    cpu_compat.enable_if_no_cuda()
    cfg = load_config(config, overrides)
    layout = start_processes(cfg)
    batches = replica_batches(cfg, layout)
    seen = []
    for _ in range(int(steps)):
        batch = next(batches)
        seen.append([[int(d), int(i)] for d, i in zip(batch.domain, batch.index)])
    Path(out_dir, f"rank{layout.rank}.json").write_text(json.dumps({
        "rank": layout.rank, "dp_rank": layout.dp_rank, "tp_rank": layout.tp_rank,
        "pp_rank": layout.pp_rank, "batches": seen}))
    shutdown()


if __name__ == "__main__":
    main()
