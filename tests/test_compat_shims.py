"""heft's start-up shims over torch and megatron-core (each explained in its module): they give
what the upstream code they replace gives, and step aside where that code has changed."""

from __future__ import annotations

import queue


def test_a_synchronous_save_collects_write_results_in_process_and_restores_the_upstream_queue():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from heft.launcher.checkpoint import write_results

    before = filesystem_async._results_queue
    with write_results.kept_in_process():
        inside = filesystem_async._get_write_results_queue()  # what a save's writer asks for
        assert isinstance(inside, queue.Queue)  # not a spawned manager's proxy
        inside.put({"rank": 0})
        assert inside.get_nowait() == {"rank": 0}
    assert filesystem_async._results_queue is before


def test_rendezvous_event_names_equal_torchs():
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    from heft.launcher.launch import rendezvous_names

    upstream = dynamic_rendezvous.get_method_name
    assert upstream is not rendezvous_names._method_name  # installed only by `heft train`'s agent

    def caller_of(helper):
        def record():
            return helper()
        return record()

    def next_rendezvous():  # as in torch: the event is named after the method that recorded it
        return caller_of(upstream), caller_of(rendezvous_names._method_name)

    theirs, ours = next_rendezvous()
    assert ours == theirs == "caller_of"
    assert rendezvous_names._method_name(10_000) == "no_method_name"
