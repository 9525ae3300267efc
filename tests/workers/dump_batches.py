"""torchrun worker: what each rank receives from heft's data iterator, for several layouts in one
set of processes.

    python -m torch.distributed.run --nproc-per-node=N tests/workers/dump_batches.py CASES.json

CASES.json lists ``{"name", "out", "steps", "config", "overrides"}``. For each case every rank builds
heft's process groups for that layout and its replica's batches, and writes its layout coordinates
and the (domain, index) pairs of each of its ``steps`` batches to ``out/rank<R>.json``. Between cases
the default process group stays and megatron-core's groups are rebuilt (as in train_cases.py).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from heft.launcher.config import load_config
    from heft.launcher.train.build import replica_batches, start_processes
    from heft.model import cpu_compat
    from heft.model.parallel import shutdown

    cpu_compat.enable_if_no_cuda()
    for case in json.loads(Path(sys.argv[1]).read_text()):
        cfg = load_config(case["config"], case["overrides"])
        layout = start_processes(cfg)
        batches = replica_batches(cfg, layout)
        seen = []
        for _ in range(int(case["steps"])):
            batch = next(batches)
            seen.append([[int(d), int(i)] for d, i in zip(batch.domain, batch.index)])
        batches.close()
        Path(case["out"]).mkdir(parents=True, exist_ok=True)
        Path(case["out"], f"rank{layout.rank}.json").write_text(json.dumps({
            "rank": layout.rank, "dp_rank": layout.dp_rank, "tp_rank": layout.tp_rank,
            "pp_rank": layout.pp_rank, "batches": seen}))
        dist.barrier()
        parallel_state.destroy_model_parallel()
    shutdown()


if __name__ == "__main__":
    main()
