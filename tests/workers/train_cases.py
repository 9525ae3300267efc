"""torchrun worker: several heft training runs, one after another, in one set of processes.

    python -m torch.distributed.run --nproc-per-node=N tests/workers/train_cases.py CASES.json

CASES.json lists ``{"name", "config", "overrides"}``; each case is heft's own ``train(cfg)`` (the
loop every `heft train` worker runs: build, steps, evaluation, checkpoint, metrics.jsonl), each with
its own ``train.run_dir`` among its overrides. Why one job: a launch costs a torchrun agent and N
fresh interpreters importing torch and megatron-core (about 7 s on 2 cores); the layout tests need a
process group per layout, not new processes (tests/conftest.py ``layout_runs``).

Between cases the default process group stays and megatron-core's model-parallel groups are
destroyed and rebuilt for the next layout, as megatron-core's own tests do; heft's ``train`` would
destroy the default group too, which torchrun's store does not let a process create again.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    from megatron.core import parallel_state

    from heft.launcher.config import load_config
    from heft.launcher.launch import known_warnings
    from heft.launcher.train.loop import train
    from heft.model import parallel
    from heft.model.megatron_import import import_megatron

    known_warnings.filter_known_warnings()
    import_megatron()
    cases = json.loads(Path(sys.argv[1]).read_text())
    close_all = parallel.shutdown

    def keep_the_process_group():
        import torch.distributed as dist

        dist.barrier()
        parallel_state.destroy_model_parallel()

    parallel.shutdown = keep_the_process_group
    try:
        for case in cases:
            print(f"=== case {case['name']}", flush=True)  # before: a failing case is named in the log
            started = time.perf_counter()
            train(load_config(case["config"], case["overrides"]))
            print(f"=== case {case['name']} done in {time.perf_counter() - started:.1f} s", flush=True)
    finally:
        parallel.shutdown = close_all
    close_all()


if __name__ == "__main__":
    main()
