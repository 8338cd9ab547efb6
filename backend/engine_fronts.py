"""The engine process's side: one EngineCore serving one or more fronts (backend/engine_process.py
is the fronts' side and starts this process).

Why several: a Triton model instance is a Python stub process, and one stub's GIL bounds how many
responses it sends (on the H100, the server reached 34-38k tok/s at 128-256 clients where the engine
alone gave 62k). Two instances with an engine each halve the batch of each (0.57x on the H100); two
stubs in front of one engine keep its batch whole. So the first front starts the engine process
through pipes and, given a name, the process also listens on the abstract Unix socket of that name,
where the fronts of the same model instance group join it (`serve_engine`).

Each front numbers its requests from its slot's base (`slot << SLOT_SHIFT`), so the ids of all
fronts share one space: the engine thread routes each loop's deltas by their ids' slot and sends
each front only its own. Stats go to the front that asked. A front that leaves cancels only its own
requests and gets its "closed" once their final deltas are out; the last one to leave shuts the core
down, and the process exits. A front that vanishes (its stub killed) is treated as one that left.
"""
from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
from typing import BinaryIO, Optional

from .engine_core import EngineCore
from .errors import EngineOverloadedError
from .heap import quiet_collector
from .outputs import TokenDelta

SLOT_SHIFT = 48  # a front's request ids are its slot << SLOT_SHIFT plus its own count
MAX_FRONTS = 64  # fronts connected at once (Triton instances of one model on one device); more are refused
LEAVE_TIMEOUT_S = 30.0  # a leaving front's requests get their final "cancelled" within a step or two


class Front:
    """One connected front: its end of a pipe pair or a socket, and its requests still in flight."""

    def __init__(self, slot: int, reader: BinaryIO, writer: BinaryIO):
        self.slot, self.reader, self._writer = slot, reader, writer
        self._send_lock = threading.Lock()
        self.in_flight: set[int] = set()  # added (front's thread), discarded on their final delta (engine thread)
        self.leaving = False
        self.drained = threading.Event()  # leaving, and none of its requests is in flight

    def send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                pickle.dump(message, self._writer)
                self._writer.flush()
        except (BrokenPipeError, OSError, ValueError):  # the front is gone; its thread finds EOF and leaves
            pass

    def finished(self, request_id: int) -> None:
        self.in_flight.discard(request_id)
        if self.leaving and not self.in_flight:
            self.drained.set()


class Fronts:
    """The connected fronts: slots, routing of the deltas, leaving."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_slot: dict[int, Front] = {}
        # Never reused: a front that left after LEAVE_TIMEOUT_S may leave requests running, whose
        # deltas must reach no later front.
        self._next_slot = 0
        self._closing = False  # the last front left: nobody joins a core that is shutting down
        self.empty = threading.Event()

    def join(self, reader: BinaryIO, writer: BinaryIO) -> Front:
        with self._lock:
            if self._closing:
                raise EngineOverloadedError("the shared engine is shutting down")
            if len(self._by_slot) >= MAX_FRONTS:  # a deployment's mistake, not a wait: the joining front raises it
                raise ValueError(f"the shared engine serves {MAX_FRONTS} fronts already")
            front = self._by_slot[self._next_slot] = Front(self._next_slot, reader, writer)
            self._next_slot += 1
            return front

    def reports_engine_stats(self, front: Front) -> bool:
        """One front exports the engine's own gauges and counters, so a sum over instances counts them once."""
        with self._lock:
            return front.slot == min(self._by_slot)

    def publish(self, deltas: list[tuple[int, TokenDelta]]) -> None:
        """The engine thread: each front gets its requests' deltas of this loop (none if it has none)."""
        by_slot = self._by_slot
        if len(by_slot) == 1:  # the usual case: no routing
            routed = {front.slot: deltas for front in list(by_slot.values())}
        else:
            routed = {slot: [] for slot in list(by_slot)}
            for item in deltas:
                routed.setdefault(item[0] >> SLOT_SHIFT, []).append(item)
        for slot, mine in routed.items():
            front = by_slot.get(slot)
            if front is None:  # it left; the requests it left behind were cancelled
                continue
            plain, others = pack_deltas(mine)
            for request_id, delta in others:
                if delta.finish_reason is not None:
                    front.finished(request_id)
            front.send(("deltas", (plain, others)))

    def leave(self, front: Front, core: EngineCore) -> bool:
        """Cancel what `front` has in flight and wait for their final deltas; a front alone shuts the
        core down instead (which cancels everything and sends them too). True if the process is to
        exit: the last front has left (fronts that leave at once, as a server's instances do when it
        stops, find out which was last as they go)."""
        with self._lock:
            alone = len(self._by_slot) == 1
            self._closing = alone
        if alone:
            core.shutdown()
        else:
            front.leaving = True
            for request_id in list(front.in_flight):
                core.end(request_id, "cancelled")
            if not front.in_flight:
                front.drained.set()
            front.drained.wait(LEAVE_TIMEOUT_S)
        with self._lock:
            del self._by_slot[front.slot]
            last = not self._by_slot
            self._closing = self._closing or last
        if last and not alone:
            core.shutdown()
        return last


def serve_front(front: Front, fronts: Fronts, core: EngineCore) -> None:
    """Apply one front's commands until it leaves (or vanishes)."""
    while True:
        try:
            message = pickle.load(front.reader)
        except (EOFError, OSError):  # the front is gone: leave for it
            message = ("shutdown",)
        kind = message[0]
        if kind == "add":
            front.in_flight.add(message[1])
            core.add(*message[1:])
        elif kind == "end":
            core.end(*message[1:])
        elif kind == "stats":
            front.send(("stats", (core.stats(), fronts.reports_engine_stats(front))))
        elif kind == "shutdown":
            exits = fronts.leave(front, core)
            front.send(("closed", exits))
            if exits:
                fronts.empty.set()
            return


def serve_engine(commands: BinaryIO, events: BinaryIO, shared_as: Optional[str]) -> None:
    """The engine process: build the core from the config the first front sends on its pipe, then
    serve it and, with `shared_as`, every front that joins on that socket, until the last one leaves."""
    fronts = Fronts()
    first = fronts.join(commands, events)
    _, config, eos_token_ids = pickle.load(commands)
    try:
        core = EngineCore(config, eos_token_ids, publish=fronts.publish)
    except BaseException as exc:  # the front raises it
        first.send(("failed", exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}")))
        return
    quiet_collector()  # the model and its graphs are in: GC pauses would stall the steps
    listener = None
    if shared_as is not None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind("\0" + shared_as)  # abstract: gone with this process, no file left behind
        listener.listen(MAX_FRONTS)
        threading.Thread(target=_accept, args=(listener, fronts, core), name="gemma-engine-accept",
                         daemon=True).start()
    _send_ready(first, core)
    threading.Thread(target=serve_front, args=(first, fronts, core), name="gemma-engine-front-0",
                     daemon=True).start()
    fronts.empty.wait()
    if listener is not None:
        listener.close()


def _accept(listener: socket.socket, fronts: Fronts, core: EngineCore) -> None:
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:  # closed: the process is exiting
            return
        threading.Thread(target=_admit, args=(connection, fronts, core), name="gemma-engine-join",
                         daemon=True).start()


def _admit(connection: socket.socket, fronts: Fronts, core: EngineCore) -> None:
    """A front joining on the socket: the same user only (the socket carries pickles), and the same
    engine config as the running core's, else it is refused and starts nothing."""
    _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
    if uid != os.getuid():
        connection.close()
        return
    reader, writer = connection.makefile("rb"), connection.makefile("wb")
    connection.close()  # the files keep the socket open
    try:
        _, config = pickle.load(reader)
    except (EOFError, OSError, pickle.UnpicklingError, ValueError):  # not a front's join
        return
    refused: Optional[Exception] = None
    if config != core.config:
        refused = ValueError(f"the shared engine runs another config: {core.config}, not {config}")
    else:
        try:
            front = fronts.join(reader, writer)
        except (EngineOverloadedError, ValueError) as e:
            refused = e
    if refused is not None:
        Front(-1, reader, writer).send(("failed", refused))
        return
    _send_ready(front, core)
    serve_front(front, fronts, core)


def _send_ready(front: Front, core: EngineCore) -> None:
    """What a front needs of the running core: its limits, device, the front's id slot, the pid to kill if hung."""
    front.send(("ready", (core.limits, core.device, front.slot, os.getpid())))


def pack_deltas(deltas: list[tuple[int, TokenDelta]]) -> tuple[list[int], list[tuple[int, TokenDelta]]]:
    """A loop's deltas for the pipe: each that is one token and nothing more (the steady state of
    decoding) as three ints (request id, token, cached prompt tokens) of one flat list, the others as
    they are. Pickling 256 TokenDeltas took ~0.2 ms of the engine thread on the CPU VM, a list of ints
    a twentieth of it. The one-token ones go first: none of them can follow another delta of the same
    request in one loop (a delta with more - an end, logprobs, drafts - is a request's last of the
    loop, or all of its deltas have more)."""
    plain: list[int] = []
    others = []
    for request_id, delta in deltas:
        if (len(delta.token_ids) == 1 and delta.finish_reason is None and delta.logprobs is None
                and delta.ends_with_stop_id):
            plain += (request_id, delta.token_ids[0], delta.num_cached_tokens)
        else:
            others.append((request_id, delta))
    return plain, others


def _picklable(exc: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
        return True
    except Exception:  # noqa: BLE001 - any failure means: send a plain RuntimeError instead
        return False
