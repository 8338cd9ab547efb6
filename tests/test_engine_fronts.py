"""One engine process shared by several fronts (backend/engine_fronts.py), as a server's model
instances share it: one process whatever the order they start in, each front's outputs its own and
the same as an engine of its own, a front that leaves cancelling only its requests, the last one
stopping the process (fronts that leave at once too), a config that differs refused, the queue
bound held for all fronts together, and a dead engine replaced by one shared again."""
import dataclasses
import os
import signal
import threading
import uuid

import pytest

from backend.engine import Engine
from backend.engine_fronts import MAX_FRONTS, SLOT_SHIFT, Fronts
from backend.loader import start_engine
from backend.params import EngineConfig, SamplingParams
from tests.engine_runs import GREEDY, PROMPTS, wait_idle
from tests.support.waiting import wait_for

LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


def config(checkpoint, **kw) -> EngineConfig:
    return EngineConfig(checkpoint=str(checkpoint), max_num_batched_tokens=16, **kw)


@pytest.fixture
def name():
    return f"gemma-test/{os.getpid()}/{uuid.uuid4().hex}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read()
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has exited


def start_fronts(checkpoint, name: str, n: int, **kw) -> list[Engine]:
    """`n` fronts started at once, from threads, as Triton initializes its instances."""
    fronts: list = [None] * n

    def start(i):
        fronts[i] = start_engine(config(checkpoint, **kw), engine_process=True, shared_as=name)
    threads = [threading.Thread(target=start, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(fronts), fronts
    return fronts


def test_fronts_started_at_once_share_one_process_each_gets_its_own_outputs_and_leaving_at_once_stops_it(servable_checkpoint, name):
    own = start_engine(config(servable_checkpoint), engine_process=True)
    try:
        expected = [own.submit(p, GREEDY).result().token_ids for p in PROMPTS]
    finally:
        own.shutdown()
    fronts = start_fronts(servable_checkpoint, name, 3)
    try:
        assert len({front.core._pid for front in fronts}) == 1  # one engine process
        assert sorted(front.core.request_id_base >> SLOT_SHIFT for front in fronts) == [0, 1, 2]
        # Every front's requests at once, in one batch: each front gets exactly its own.
        handles = [[front.submit(p, GREEDY) for p in PROMPTS] for front in fronts]
        for mine in handles:
            assert [h.result().token_ids for h in mine] == expected
        # The engine's own stats: one front reports them, the others do not.
        stats = [wait_idle(front) for front in fronts]
        assert [front.reports_engine_stats for front in fronts].count(True) == 1
        assert all(s.kv_cache.used_blocks == 0 for s in stats)
        assert stats[0].step_times.steps == stats[2].step_times.steps > 0  # one engine's counters
        # Leaving at once, as a server's instances do when it stops: each leaves thinking another
        # stays, and the last one out stops the process.
        pid = fronts[0].core._pid
        handles = [front.submit(PROMPTS[0], LONG) for front in fronts]
        threads = [threading.Thread(target=front.shutdown) for front in fronts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [h.result().finish_reason for h in handles] == ["cancelled"] * 3
        assert wait_for(lambda: not alive(pid), timeout=30)
    finally:
        for front in fronts:
            front.shutdown()


def test_another_config_is_refused_a_front_that_leaves_cancels_only_its_own_and_the_last_stops_it(servable_checkpoint, name):
    first, second = start_fronts(servable_checkpoint, name, 2)
    pid = first.core._pid
    try:
        with pytest.raises(ValueError, match="the shared engine runs another config"):
            start_engine(config(servable_checkpoint, max_num_seqs=3), engine_process=True, shared_as=name)
        leaving = first.submit(PROMPTS[0], LONG)
        staying = second.submit(PROMPTS[1], dataclasses.replace(LONG, max_tokens=40))
        next(iter(leaving))
        first.shutdown()
        assert leaving.result().finish_reason == "cancelled"
        stayed = staying.result()
        assert stayed.finish_reason == "length" and stayed.num_output_tokens == 40
        assert alive(pid)
        assert second.submit(PROMPTS[2], GREEDY).result().num_output_tokens == GREEDY.max_tokens
        wait_idle(second)
        assert second.reports_engine_stats  # the one left reports the engine's stats now
        # A front joining now gets a new slot, never the one that left (its ids may still be running).
        third = start_engine(config(servable_checkpoint), engine_process=True, shared_as=name)
        assert third.core._pid == pid and third.core.request_id_base >> SLOT_SHIFT == 2
        third.shutdown()
        assert alive(pid)
    finally:
        second.shutdown()
    assert wait_for(lambda: not alive(pid), timeout=30)


def test_the_queue_bound_holds_for_the_fronts_together(servable_checkpoint, name):
    """max_queue_size is the engine's: with one front's requests filling it, another front's request
    ends "overloaded" (the server answers UNAVAILABLE), and one is taken again once there is room."""
    first, second = start_fronts(servable_checkpoint, name, 2, max_num_seqs=1, max_queue_size=2)
    try:
        running = first.submit(PROMPTS[0], LONG)
        assert wait_for(lambda: first.stats().num_running == 1)  # so it no longer counts as waiting
        waiting = [first.submit(PROMPTS[1], LONG) for _ in range(2)]
        assert wait_for(lambda: first.stats().num_waiting == 2)  # in the engine: its fronts' pipes race
        refused = second.submit(PROMPTS[2], GREEDY).result()  # its own front holds none of the three
        assert (refused.finish_reason, refused.token_ids) == ("overloaded", [])
        assert refused.error == "2 requests are already waiting; retry later"
        for handle in (running, *waiting):
            handle.cancel()
            assert handle.result().finish_reason in ("cancelled", "length")  # (the first may have ended)
        assert second.submit(PROMPTS[2], GREEDY).result().num_output_tokens == GREEDY.max_tokens
        assert wait_idle(second).kv_cache.used_blocks == 0
    finally:
        first.shutdown()
        second.shutdown()


def test_a_dead_shared_engine_fails_every_fronts_requests_and_is_replaced_by_one_again(servable_checkpoint, name):
    fronts = start_fronts(servable_checkpoint, name, 2)
    try:
        handles = [front.submit(PROMPTS[0], LONG) for front in fronts]
        for h in handles:
            next(iter(h))  # running
        os.kill(fronts[0].core._pid, signal.SIGKILL)
        outs = [h.result() for h in handles]
        assert [o.finish_reason for o in outs] == ["error", "error"]
        assert all("engine process exited unexpectedly" in o.error for o in outs), [o.error for o in outs]
        # Each front starts a fresh engine as the model does after a death: one of them starts it, the other joins.
        fresh: list = [None, None]

        def restart(i):
            fresh[i] = Engine(fronts[i].config, fronts[i].tokenizer, engine_process=True, shared_as=name)
        threads = [threading.Thread(target=restart, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for front in fronts:
            front.shutdown()
        fronts = fresh
        assert fresh[0].core._pid == fresh[1].core._pid
        assert sorted(f.started_here for f in fresh) == [False, True]
        assert [f.submit(PROMPTS[1], GREEDY).result().finish_reason for f in fresh] == ["length", "length"]
    finally:
        for front in fronts:
            if front is not None:
                front.shutdown()


def test_one_front_too_many_is_refused_as_a_mistake_not_a_wait():
    """A joining front retries while an engine shuts down (EngineOverloadedError), but raises this."""
    fronts = Fronts()
    for _ in range(MAX_FRONTS):
        fronts.join(None, None)
    with pytest.raises(ValueError, match=f"serves {MAX_FRONTS} fronts already"):
        fronts.join(None, None)
