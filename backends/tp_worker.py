"""The ranks 1.. of a tensor-parallel engine: one spawned process each, and their handle in rank 0.

A worker builds a runner of its rank (rank 0's class: TorchModelRunner), loads its shard, reports "ready", joins the process group
and then loops: receive (method, args) from rank 0 over the control group, run the runner's method (a
step's forward, the KV-cache allocation), which meets rank 0 in the model's collectives; "stop" ends it.

Failures: a worker that raises reports its traceback on the status queue and exits; a worker that dies or
hangs makes rank 0's next collective fail (gloo sees the closed connection at once; a stuck rank runs into
the collective timeout, GLM_SERVE_TP_TIMEOUT_S). TPWorkers.guard turns either into TPWorkerError, which
the engine's step loop reports as a dead engine. If rank 0 dies, the workers' control receive fails and
they exit; they are daemon processes besides, which multiprocessing ends with the engine process."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backends import parallel
from server.config import EngineConfig

log = logging.getLogger(__name__)

STOP = "stop"
JOIN_TIMEOUT_S = 10.0


class TPWorkerError(RuntimeError):
    """A tensor-parallel worker failed, died, or stopped answering."""


class TPWorkers:
    """Rank 0's handle on the worker processes: start, wait until they are loaded, send them each step,
    translate their failures, stop them."""

    def __init__(self, config: EngineConfig, model_dir: Path, runner_class: type):
        self.size = config.tensor_parallel_size
        if config.device == "cpu" and not config.num_threads:  # ranks share the host's cores
            config = dataclasses.replace(config, num_threads=max(1, torch.get_num_threads() // self.size))
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.port = parallel.free_port()
        self.timeout_s = parallel.collective_timeout_s()
        ctx = mp.get_context("spawn")
        self.status = ctx.Queue()
        self.control: Any = None
        self.failed = False  # a step failed: the workers cannot finish cleanly, stop() ends them at once
        self.procs = [
            ctx.Process(
                target=worker_main,
                args=(rank, runner_class, config, str(model_dir), self.port, self.timeout_s, self.status),
                name=f"glm-serve-tp{rank}",
                daemon=True,
            )
            for rank in range(1, self.size)
        ]
        for proc in self.procs:
            proc.start()

    def connect(self) -> None:
        """Once rank 0 has loaded: wait for every worker's shard, then form the process group with them."""
        pending = set(range(1, self.size))
        while pending:
            try:
                kind, rank, detail = self.status.get(timeout=0.2)
            except queue.Empty:
                if dead := self._dead():
                    raise TPWorkerError(f"tensor-parallel worker(s) died while loading: {dead}") from None
                continue
            if kind == "error":
                raise TPWorkerError(f"tensor-parallel worker rank {rank} failed while loading:\n{detail}")
            pending.discard(rank)
        self.control = parallel.init_process_group(
            self.config.device, 0, self.size, self.port, self.timeout_s
        )
        log.info("tensor parallelism: %d ranks over %s", self.size, dist.get_backend())

    def send(self, method: str, args: tuple) -> None:
        """Broadcast (method, args) to the workers. Waits at most the collective timeout: gloo's root blocks
        until the receivers take the message, so a stuck worker must not stall it forever."""
        payload = torch.frombuffer(bytearray(pickle.dumps((method, args))), dtype=torch.uint8)
        timeout = timedelta(seconds=self.timeout_s)
        for tensor in (torch.tensor([payload.numel()], dtype=torch.long), payload):
            dist.broadcast(tensor, src=0, group=self.control, async_op=True).wait(timeout)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Report a failed step as the worker failure behind it, or as a failed collective (the backends
        raise RuntimeError: a closed connection, a timeout)."""
        try:
            yield
        except Exception as exc:
            self.failed = True
            problem = self._failure(wait_s=1.0)
            if problem is None and not isinstance(exc, RuntimeError):
                raise  # rank 0's own error
            raise TPWorkerError(
                problem
                or f"a tensor-parallel collective failed (a stuck rank runs into the {self.timeout_s:g}s timeout, "
                f"{parallel.TIMEOUT_ENV}): {exc}"
            ) from exc

    def stop(self) -> None:
        """Ask the workers to stop, end those that do not, and leave the process group."""
        if self.control is None or self.failed:  # not in the process group yet, or broken: nothing to finish
            for proc in self.procs:
                proc.kill()
        else:
            with contextlib.suppress(Exception):
                self.send(STOP, ())
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                log.warning("tensor-parallel worker %s did not stop; killing it", proc.name)
                proc.kill()  # SIGKILL: also ends a stopped (SIGSTOP) or stuck process
                proc.join(5)
        parallel.destroy_process_group()
        self.control = None
        self.status.close()
        self.status.join_thread()

    def _dead(self) -> str:
        return ", ".join(
            f"rank {i + 1} (exit code {p.exitcode})" for i, p in enumerate(self.procs) if not p.is_alive()
        )

    def _failure(self, wait_s: float) -> str | None:
        """What went wrong with the workers: their reported errors, else the dead ones; None if nothing."""
        deadline = time.monotonic() + wait_s
        errors = []
        while time.monotonic() < deadline:
            try:
                kind, rank, detail = self.status.get(timeout=0.05)
            except queue.Empty:
                if errors or self._dead():  # a killed worker reports nothing
                    break
                continue
            if kind == "error":
                errors.append(f"tensor-parallel worker rank {rank} failed:\n{detail}")
        if errors:
            return "\n".join(errors)
        dead = self._dead()
        return f"tensor-parallel worker(s) died: {dead}" if dead else None


def receive(control: Any) -> tuple[str, tuple]:
    """The next (method, args) that rank 0 sends (TPWorkers.send); waits as long as the engine idles."""
    size = torch.empty(1, dtype=torch.long)
    dist.broadcast(size, src=0, group=control)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=control)
    return pickle.loads(payload.numpy().tobytes())


def worker_main(
    rank: int,
    runner_class: type,
    config: EngineConfig,
    model_dir: str,
    port: int,
    timeout_s: float,
    status: Any,
) -> None:
    """The process of one worker rank (spawned by TPWorkers): a `runner_class(config, model_dir, rank=rank)`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the engine, which stops the workers
    try:
        if config.device == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        runner = runner_class(config, Path(model_dir), rank=rank)
        runner.load_model()
        status.put(("ready", rank, ""))
        control = parallel.init_process_group(
            config.device, rank, config.tensor_parallel_size, port, timeout_s
        )
        while True:
            method, args = receive(control)
            if method == STOP:
                break
            getattr(runner, method)(*args)
    except BaseException:
        status.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        parallel.destroy_process_group()
