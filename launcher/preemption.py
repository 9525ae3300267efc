"""Stop requests: SIGTERM or SIGUSR1 on any rank asks the whole job to save and exit.

The handler only records the signal. At each step boundary (and between blocks of evaluation
microbatches) every rank joins one small all-reduce, so all ranks agree to stop at the same step
even if the signal reached only one of them; then every rank saves and the worker exits with
status 75 ("saved, requeue me"). A second signal during the save changes nothing: the handler stays
installed, and the checkpoint being written becomes complete only after every rank finished.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    def __init__(self, device: torch.device):
        self.device = device
        self.received = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> int:
        """Collective: the signal number any rank received (0: none). Same answer on every rank."""
        flag = torch.tensor([self.received], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
