"""The engine core's channel, measured: one step's StepOutputs (msgpack) from a child process to this one and
a small message back, over multiprocessing pipes and (where pyzmq is installed) a ZeroMQ PAIR socket over
ipc, as vLLM's core client uses. Prints microseconds per round trip and encode/decode cost; the choice is
recorded in server/engine_core_client.py.

    PYTHONPATH=. python benchmarks/core_channel.py [--batch 128] [--steps 3000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time

from server.engine_core_messages import (
    AbortRequests,
    CoreStats,
    RequestOutput,
    StepOutputs,
    decode_input,
    decode_output,
    encode,
)


def step_message(batch: int) -> StepOutputs:
    outputs = [RequestOutput(f"chatcmpl-{i:032x}", [1000 + i], num_cached_tokens=16) for i in range(batch)]
    stats = CoreStats(
        batch, 3, 300, 0.42, 500, 60000, {"num_preemptions_total": 0.0, "num_kv_blocks": 4096.0}
    )
    return StepOutputs(outputs, stats, 12345)


def pipe_child(batch: int, steps: int, inputs, outputs) -> None:
    data = encode(step_message(batch))
    for _ in range(steps):
        outputs.send_bytes(data)
        decode_input(inputs.recv_bytes())


def zmq_child(batch: int, steps: int, address: str) -> None:
    import zmq

    socket = zmq.Context().socket(zmq.PAIR)
    socket.connect(address)
    data = encode(step_message(batch))
    for _ in range(steps):
        socket.send(data, copy=False)
        decode_input(socket.recv())


def measure_pipe(batch: int, steps: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    child_in, parent_out = ctx.Pipe(duplex=False)
    parent_in, child_out = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=pipe_child, args=(batch, steps, child_in, child_out))
    proc.start()
    reply = encode(AbortRequests(["x"]))
    decode_output(parent_in.recv_bytes())  # the child has started
    parent_out.send_bytes(reply)
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        decode_output(parent_in.recv_bytes())
        parent_out.send_bytes(reply)
    elapsed = time.perf_counter() - t0
    proc.join()
    return elapsed / (steps - 1) * 1e6


def measure_zmq(batch: int, steps: int) -> float | None:
    try:
        import zmq
    except ImportError:
        return None
    address = f"ipc://{tempfile.mktemp(prefix='core-channel-')}"
    socket = zmq.Context().socket(zmq.PAIR)
    socket.bind(address)
    proc = multiprocessing.get_context("spawn").Process(target=zmq_child, args=(batch, steps, address))
    proc.start()
    reply = encode(AbortRequests(["x"]))
    decode_output(socket.recv())
    socket.send(reply)
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        decode_output(socket.recv())
        socket.send(reply)
    elapsed = time.perf_counter() - t0
    proc.join()
    return elapsed / (steps - 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    message = step_message(args.batch)
    data = encode(message)
    t0 = time.perf_counter()
    for _ in range(1000):
        decode_output(encode(message))
    codec_us = (time.perf_counter() - t0) * 1e3
    print(f"StepOutputs of {args.batch} requests: {len(data)} bytes; encode+decode {codec_us:.1f} us")
    for name, measure in (("pipe", measure_pipe), ("zmq", measure_zmq), ("pipe", measure_pipe)):
        us = measure(args.batch, args.steps)
        print(f"{name}: " + ("pyzmq not installed" if us is None else f"{us:.1f} us per round trip"))


if __name__ == "__main__":
    main()
