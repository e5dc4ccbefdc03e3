"""How the HTTP process reaches the engine core: in a thread of its own (ThreadCoreClient, for tests and
debugging) or in a process of its own (ProcessCoreClient, the default of `serve`, engine.core_process).

Both run the same EngineCore and its loop (server/engine_core.py); a client only moves messages: send()
hands a CoreInput to the core, and every CoreOutput the core produces is passed to the `deliver` callback,
from the client's thread (the front end hops it onto its event loop).

The channel of the process mode is a pair of multiprocessing pipes carrying msgpack (msgspec): one message
per step, never per token. Measured with benchmarks/core_channel.py (one step's outputs of 128 requests x 1
token, 7 kB; the 2-core shared dev host, 2026-12-08, two runs): a round trip took 95-130 us over the pipes
and 210-320 us over a ZeroMQ PAIR socket on ipc (vLLM's transport), in the same runs; encoding and decoding
the message cost 60-90 us. So: pipes, which also need no extra dependency, with the core process's death
seen through its sentinel next to them."""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import queue
import signal
import threading
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

from server.config import EngineConfig
from server.engine_core import EngineCore, run_core_loop
from server.engine_core_messages import (
    CoreInput,
    CoreOutput,
    Dead,
    Failed,
    Ready,
    Shutdown,
    decode_input,
    decode_output,
    encode,
)

log = logging.getLogger(__name__)

Deliver = Callable[[CoreOutput], None]
SHUTDOWN_TIMEOUT_S = 15.0  # the core finishes its step and stops its tensor-parallel workers within this


class CoreLoadError(RuntimeError):
    """The engine core could not load the model (the message names the core's own error)."""


class ThreadCoreClient:
    """The core in a thread of this process: messages are handed over as objects."""

    def __init__(self, config: EngineConfig):
        self.core = EngineCore(config)
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def load(self) -> Ready:
        return self.core.load_model()

    def start(self, deliver: Deliver) -> None:
        self._thread = threading.Thread(
            target=run_core_loop, args=(self.core, self._inbox, deliver), name="engine-core", daemon=True
        )
        self._thread.start()

    def send(self, message: CoreInput) -> None:
        self._inbox.put(message)

    def shutdown(self) -> None:
        self._inbox.put(Shutdown())
        if self._thread is not None:
            self._thread.join(SHUTDOWN_TIMEOUT_S)
        self.core.shutdown()


class ProcessCoreClient:
    """The core in a spawned process (not a daemon: its runner may spawn tensor-parallel workers)."""

    core = None  # lives in the other process

    def __init__(self, config: EngineConfig):
        self.config = config
        context = multiprocessing.get_context("spawn")
        core_inputs, self._inputs = context.Pipe(duplex=False)
        self._outputs, core_outputs = context.Pipe(duplex=False)
        self.process = context.Process(
            target=core_process_main, args=(config, core_inputs, core_outputs), name="glm-serve-core"
        )
        self.process.start()
        core_inputs.close()  # this process keeps only its own ends: the core's exit closes the channel
        core_outputs.close()
        self._send_lock = threading.Lock()
        self._closing = False
        self._receiver: threading.Thread | None = None
        # An engine never shut down (a test that forgot, a second Ctrl-C) must not leave its core behind, nor
        # hang this process's exit: multiprocessing joins a non-daemon child at exit, so stop it first.
        self._finalizer = weakref.finalize(self, _stop_process, self.process, self._inputs)
        atexit.register(self._finalizer)

    def load(self) -> Ready:
        """Wait for the core's Ready (its model is loaded); a core that fails or dies meanwhile raises."""
        message = self._receive(timeout=None)
        if isinstance(message, Ready):
            return message
        self.shutdown()
        if isinstance(message, Failed):
            raise CoreLoadError(f"{message.error_type}: {message.message}")
        raise CoreLoadError(
            f"the engine core process exited while loading (exit code {self.process.exitcode})"
        )

    def _receive(self, timeout: float | None) -> CoreOutput | None:
        """The core's next message; None on timeout; Dead when the core process is gone."""
        ready = wait([self._outputs, self.process.sentinel], timeout)
        if not ready:
            return None
        if self._outputs in ready or self._outputs.poll():  # what it sent before it exited comes first
            try:
                return decode_output(self._outputs.recv_bytes())
            except (EOFError, OSError):
                pass
        self.process.join(5)
        return Dead(f"the engine core process died (exit code {self.process.exitcode})")

    def start(self, deliver: Deliver) -> None:
        self._receiver = threading.Thread(target=self._receive_loop, args=(deliver,), name="core-receiver")
        self._receiver.daemon = True
        self._receiver.start()

    def _receive_loop(self, deliver: Deliver) -> None:
        while True:
            message = self._receive(timeout=None)
            if isinstance(message, Dead):
                if not self._closing:
                    deliver(message)
                return
            deliver(message)

    def send(self, message: CoreInput) -> None:
        data = encode(message)
        with self._send_lock:
            try:
                self._inputs.send_bytes(data)
            except (BrokenPipeError, OSError):
                pass  # the core is gone: the receiver reports it

    def shutdown(self) -> None:
        """Stop the core (it stops its workers), waiting at most SHUTDOWN_TIMEOUT_S before killing it."""
        self._closing = True
        self.send(Shutdown())
        self._finalizer()
        if self._receiver is not None:
            self._receiver.join(5)
        self._outputs.close()


def _stop_process(process: multiprocessing.Process, inputs: Connection) -> None:
    inputs.close()  # the core's input reader sees EOF and stops the core
    process.join(SHUTDOWN_TIMEOUT_S)
    if process.is_alive():
        log.warning("the engine core did not stop within %.0fs: killing it", SHUTDOWN_TIMEOUT_S)
        process.kill()
        process.join(5)


def core_process_main(config: EngineConfig, inputs: Connection, outputs: Connection) -> None:
    """The engine core process: load, say Ready, run the loop until Shutdown or until the HTTP process's
    end of the channel closes (it exited or was killed). Exits 1 when the loop failed."""
    # Ctrl-C and SIGTERM go to the HTTP process, which drains and then stops the core with Shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s engine-core %(name)s: %(message)s"
    )
    core = EngineCore(config)
    try:
        ready: CoreOutput = core.load_model()
    except BaseException as exc:  # noqa: BLE001 (the HTTP process reports it and exits non-zero)
        log.exception("engine core failed to load")
        core.shutdown()
        outputs.send_bytes(encode(Failed(type(exc).__name__, str(exc))))
        raise SystemExit(1) from None
    outputs.send_bytes(encode(ready))
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_read_inputs, args=(inputs, inbox), name="core-inputs", daemon=True).start()
    failed: list[Dead] = []

    def send(message: CoreOutput) -> None:
        if isinstance(message, Dead):
            failed.append(message)
        try:
            outputs.send_bytes(encode(message))
        except (BrokenPipeError, OSError):
            inbox.put(Shutdown())  # the HTTP process is gone

    try:
        run_core_loop(core, inbox, send)
    finally:
        core.shutdown()
    if failed:
        raise SystemExit(1)


def _read_inputs(inputs: Connection, inbox: queue.Queue) -> None:
    while True:
        try:
            message: Any = decode_input(inputs.recv_bytes())
        except (EOFError, OSError):
            message = Shutdown()
        inbox.put(message)
        if isinstance(message, Shutdown):
            return
