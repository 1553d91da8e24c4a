"""The worker process: ``python -m lmi_core.worker --socket BASE``.

Binds ``BASE.<rank>`` (rank from the MPI launcher's environment, 0 in Python mode), prints a ready
line, accepts the server's connection, loads the engine through the ``load_engine`` hook when the
server sends ``init``, and serves requests concurrently through ``handle_request``. The asyncio loop
only moves messages: engines compute in their own threads, so heartbeat pings are answered while a
batch runs. The worker exits when the server's connection closes (or brings a frame the worker cannot
read: one log line, then the close) or the server process dies.
Standard library, msgpack and pluggy only (plus whatever the engine plugin imports).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Coroutine
from typing import Any

import pluggy

from lmi_core import custom_code, telemetry
from lmi_core.engine import (
    ContextEngine,
    Engine,
    EngineStats,
    Finished,
    GenerationRequest,
    ImageEngine,
    InputLimitEngine,
    LoraAdapter,
    Token,
    WorkerContext,
)
from lmi_core.errors import EngineError, ServiceError
from lmi_core.operations import Operation
from lmi_core.plugins import new_plugin_manager
from lmi_core.worker import tracing, wire

logger = logging.getLogger("lmi_core.worker")

ACCEPT_TIMEOUT = 120.0
WRITE_HIGH_WATER = 256 * 1024
PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to kill this process when its parent dies (no orphaned workers)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def mpi_rank_and_size() -> tuple[int, int]:
    """This process's rank and world size, from Open MPI / PMI environment variables."""
    for rank_var, size_var in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE"),
    ):
        if rank_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ.get(size_var, "1"))
    return 0, 1


class RankServer:
    """Serves one server connection: init, requests, cancels and pings."""

    def __init__(self, rank: int, pm: pluggy.PluginManager) -> None:
        self.rank = rank
        self.pm = pm
        self.engine: Engine | None = None
        self.context: WorkerContext | None = None
        self.tasks: dict[str, asyncio.Task[None]] = {}
        # Adapter loads/unloads in flight: held here so that the loop does not drop them half-way.
        self.adapter_tasks: set[asyncio.Task[None]] = set()
        self.writer: asyncio.StreamWriter | None = None
        self._outgoing: list[bytes] = []
        self._tokens: list[tuple[str, Token]] = []  # (request id, token) since the last write
        self.stream_interval = 1  # option.stream_interval: tokens per send of a request, by default

    def send(self, message: wire.WorkerMessage) -> None:
        """Queue a frame; frames queued in one loop iteration leave in one write (one syscall)."""
        self._schedule_flush()
        self._outgoing.append(message.to_frame())

    def send_tokens(self, rid: str, tokens: list[Token]) -> None:
        """Queue tokens: the tokens of every request queued in one loop iteration (an engine step
        delivers all its requests' outputs in one) leave as one ``toks`` frame, ahead of the other
        frames of that write, so a request's ``done`` or ``err`` still follows its last token."""
        if tokens:
            self._schedule_flush()
            self._tokens += [(rid, token) for token in tokens]

    def _schedule_flush(self) -> None:
        if not self._outgoing and not self._tokens:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        assert self.writer is not None
        frames, self._outgoing = self._outgoing, []
        if self._tokens:
            frames.insert(0, wire.Toks(self._tokens).to_frame())
            self._tokens = []
        if not self.writer.is_closing():
            self.writer.write(b"".join(frames))

    async def drain(self) -> None:
        """Wait only when the socket is backed up, not after every token."""
        assert self.writer is not None
        if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            await self.writer.drain()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handle the server's messages until it closes the connection or sends ``shutdown``. A frame
        that does not parse, or one the server never sends, closes the connection (one log line):
        the server then fails this worker and starts another, rather than talk on to a peer whose
        frames it cannot read."""
        self.writer = writer
        try:
            while (message := await wire.read_message(reader)) is not None:
                if isinstance(message, wire.Shutdown):
                    return
                self.dispatch(message)
                await self.drain()
        except (wire.ProtocolError, ConnectionError) as exc:
            logger.error("rank %d: closing the connection: %s", self.rank, exc)
        finally:
            self._flush()  # the replies already queued leave first
            writer.close()

    def dispatch(self, message: wire.Message) -> None:
        if isinstance(message, wire.Req):
            self.on_request(message)
        elif isinstance(message, wire.Op):
            self.track(message.id, self.run_operation(message.id, message.operation))
        elif isinstance(message, wire.Cancel):
            task = self.tasks.get(message.id)
            if task is not None:
                task.cancel()
        elif isinstance(message, wire.Ping):
            self.on_ping(message)
        elif isinstance(message, wire.Adapter):
            self.on_adapter(message)
        elif isinstance(message, wire.Init):
            asyncio.get_running_loop().create_task(self.on_init(message))
        else:
            raise wire.ProtocolError(f"unexpected {message.t!r} message from the server")

    async def on_init(self, message: wire.Init) -> None:
        self.context = message.context
        self.context.rank = self.rank
        try:
            self.stream_interval = stream_interval(self.context.options)
            if self.context.entry_point is not None:  # model.py: one that does not import fails the load
                await asyncio.to_thread(custom_code.load, self.context.entry_point)
            # The span sink now, when this process traces, not on the first traced request: importing
            # OpenTelemetry delayed that request's first token by ~400 ms on a loaded 2-core machine.
            await asyncio.to_thread(telemetry.span_sink, "worker")
            # Loading takes seconds to minutes: off the loop, so pings are still answered.
            engine: Engine | None = await asyncio.to_thread(self.pm.hook.load_engine, context=self.context)
            if engine is None:
                raise EngineError(f"no installed plugin loads backend {self.context.backend!r}")
            await self.start(engine)
        except BaseException as exc:  # a failed load must reach the server, whatever it is
            logger.error("rank %d: engine load failed:\n%s", self.rank, traceback.format_exc())
            self.send(wire.Err(EngineError(f"{exc.__class__.__name__}: {exc}", status=500)))
            return
        self.engine = engine
        logger.info("rank %d: engine loaded (%s)", self.rank, self.context.backend)
        limit = engine.max_model_len if isinstance(engine, ContextEngine) else None
        images = engine.max_images if isinstance(engine, ImageEngine) else 0
        if isinstance(engine, InputLimitEngine):
            limits = wire.Loaded(self.rank, limit, engine.max_input_length, engine.max_token_bytes, images)
        else:
            limits = wire.Loaded(self.rank, limit, max_images=images)
        self.send(limits)

    async def start(self, engine: Engine) -> None:
        """Start ``engine`` on this loop (``start_engine``); one that fails to start is shut down."""
        try:
            started = self.pm.hook.start_engine(engine=engine)
            if started is not None:
                await started
        except BaseException:
            with contextlib.suppress(Exception):
                self.pm.hook.shutdown_engine(engine=engine)
            raise

    def on_ping(self, message: wire.Ping) -> None:
        stats: EngineStats | None = None  # none while the engine loads
        if self.engine is not None:
            try:
                stats = self.pm.hook.engine_stats(engine=self.engine) or EngineStats()
            except Exception as exc:
                self.send(wire.Err(EngineError(f"engine unhealthy: {exc}", status=500)))
                return
        self.send(wire.Pong(message.id, stats))

    def on_request(self, message: wire.Req) -> None:
        self.track(message.id, self.run_request(message.id, message.request))

    def track(self, rid: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task that ``Cancel`` with ``rid`` stops."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks[rid] = task
        task.add_done_callback(lambda _: self.tasks.pop(rid, None))

    async def run_operation(self, rid: str, operation: Operation[Any]) -> None:
        """Answer ``operation`` (rank 0; every rank runs one that says ``all_ranks``)."""
        try:
            if self.engine is None:
                raise EngineError("engine not loaded", status=503)
            result = await self.pm.hook.handle_operation(engine=self.engine, operation=operation)
            if self.rank == 0:
                self.send(wire.OpResult(rid, operation.result_to_wire(result)))
        except asyncio.CancelledError:
            pass  # the server cancelled it and already answered the client
        except Exception as exc:
            self.fail_request(rid, exc)

    def on_adapter(self, message: wire.Adapter) -> None:
        """Load or unload a LoRA adapter in a task (reading one takes a while); no reply."""
        task = asyncio.get_running_loop().create_task(self.run_adapter(message.op, message.adapter))
        self.adapter_tasks.add(task)
        task.add_done_callback(self.adapter_tasks.discard)

    async def run_adapter(self, op: wire.AdapterOp, adapter: LoraAdapter) -> None:
        try:
            if self.engine is None:
                raise EngineError("engine not loaded", status=503)
            if op == "load":
                await self.pm.hook.load_adapter(engine=self.engine, adapter=adapter)
            else:
                await self.pm.hook.unload_adapter(engine=self.engine, name=adapter.name)
            logger.info("rank %d: adapter %s: %s done", self.rank, adapter.name, op)
        except Exception as exc:  # logged only: the request that uses the adapter gets the error
            logger.error("rank %d: adapter %s failed: %s: %s", self.rank, op, exc.__class__.__name__, exc)

    async def run_request(self, rid: str, request: GenerationRequest) -> None:
        # In MPI mode every rank runs the request (same batches everywhere); rank 0 answers.
        answer = self.rank == 0
        try:
            engine = self.engine
            if engine is None:
                raise EngineError("engine not loaded", status=503)
            # In a span of this process when the request is traced (its context came in the request).
            events = tracing.traced_generation(
                request, self.rank, lambda traced: self.pm.hook.handle_request(engine=engine, request=traced)
            )
            # Closed here, not left to the garbage collector: a cancel that lands outside the engine's
            # generator (in drain) must still run its cleanup (free the sequence) at once.
            interval = request.params.stream_interval or self.stream_interval
            held: list[Token] = []  # sent every ``interval`` tokens, the rest with the finish
            async with contextlib.aclosing(events):
                async for event in events:
                    if not answer:
                        continue
                    if isinstance(event, Finished):
                        self.send_tokens(rid, held)
                        self.send(wire.Done(rid, event))
                        continue
                    held.append(event)
                    if len(held) >= interval:
                        self.send_tokens(rid, held)
                        held = []
                    await self.drain()
        except asyncio.CancelledError:
            pass  # the server cancelled it and already answered the client
        except Exception as exc:
            self.fail_request(rid, exc)

    def fail_request(self, rid: str, exc: Exception) -> None:
        """Answer request ``rid`` with ``exc`` (rank 0): a ``ServiceError`` as it is, anything else as
        an ``EngineError`` naming it, logged with its traceback."""
        if not isinstance(exc, ServiceError):
            logger.error("rank %d: request %s failed:\n%s", self.rank, rid, traceback.format_exc())
            exc = EngineError(f"{exc.__class__.__name__}: {exc}")
        if self.rank == 0:
            self.send(wire.Err(exc, rid))

    def close(self) -> None:
        for task in [*self.tasks.values(), *self.adapter_tasks]:
            task.cancel()
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.pm.hook.shutdown_engine(engine=self.engine)
        telemetry.shutdown()


def stream_interval(options: dict[str, Any]) -> int:
    """``option.stream_interval``: how many tokens of a request the worker sends at a time (>= 1)."""
    value = options.get("stream_interval", 1)
    try:
        interval = int(str(value))  # 1.5 is refused, not rounded
    except (TypeError, ValueError):
        interval = 0
    if interval < 1:
        raise EngineError(f"option.stream_interval must be a whole number >= 1, not {value!r}", status=500)
    return interval


def bind(address: str) -> socket.socket:
    kind, target = wire.parse_address(address)
    if kind == "unix":
        assert isinstance(target, str)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # owner-only socket file
        try:
            sock.bind(target)
        finally:
            os.umask(old)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
    sock.listen(1)
    return sock


async def run(address: str, parent_pid: int | None, rank: int, parent: int) -> None:
    listener = bind(address)
    # The host names a rank on another node in the server log (its address may be 0.0.0.0).
    host = socket.gethostname()
    print(f"{wire.READY_LINE} {address} rank {rank} host {host} pid {os.getpid()}", flush=True)
    loop = asyncio.get_running_loop()
    # From the start: a server that dies before it connects must not leave this rank waiting.
    watcher = loop.create_task(watch_parent(parent_pid, parent))
    try:
        await accept_and_serve(listener, address, rank)
    finally:
        watcher.cancel()


async def accept_and_serve(listener: socket.socket, address: str, rank: int) -> None:
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    try:
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), ACCEPT_TIMEOUT)
    except TimeoutError:
        logger.error("rank %d: no server connected within %.0f s; exiting", rank, ACCEPT_TIMEOUT)
        return
    finally:
        listener.close()
        if address.startswith("unix:"):
            with contextlib.suppress(OSError):
                os.unlink(address[5:])
    reader, writer = await asyncio.open_connection(sock=conn)
    worker = RankServer(rank, new_plugin_manager())
    try:
        await worker.serve(reader, writer)
    finally:
        worker.close()


async def watch_parent(parent_pid: int | None, parent: int) -> None:
    """Exit when the server (``parent_pid``) or the launching process (``parent``, mpirun's daemon for
    a rank) is gone: backs up PR_SET_PDEATHSIG. An orphan is re-parented to init or to a subreaper,
    so a changed parent pid is the sign, not a parent pid of 1."""
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent or (parent_pid is not None and not _alive(parent_pid)):
            logger.error("parent process %s is gone; exiting", parent_pid or parent)
            os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmi_core.worker")
    parser.add_argument("--socket", required=True, help="unix socket path prefix; rank r binds PREFIX.r")
    parser.add_argument("--tcp", help="HOST:PORT: rank r listens on TCP PORT+r instead (multi-node)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process dies")
    args = parser.parse_args(argv)
    set_parent_death_signal()
    parent = os.getppid()
    rank, _ = mpi_rank_and_size()
    logging.basicConfig(
        level=os.environ.get("LMI_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        address = f"tcp:{host}:{int(port) + rank}"
    else:
        address = f"unix:{args.socket}.{rank}"
    try:
        asyncio.run(run(address, args.parent_pid, rank, parent))
    except KeyboardInterrupt:
        pass
    # Engine threads (torch, vLLM) may not be daemons; the server is gone, so leave now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
