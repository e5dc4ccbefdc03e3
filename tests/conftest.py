"""HTTP test fixtures: real uvicorn servers on 127.0.0.1, one shared engine, the official openai client.

THE ONE PLACE TO SWAP THE ENGINE is ENGINE_FACTORY below (or the GLM_SERVE_TEST_ENGINE variable): a
"module:callable" called with an EngineConfig. It builds the session's engine and is also what the
SIGTERM test's `python -m server.cli serve --engine-factory ...` subprocess serves. The default is the
real NativeEngine serving SmolLM2 on CPU; `make test-vllm` sets backends.vllm_engine:VllmEngine, and
tests.fake_engine:FakeEngine (a test double) gives a fast loop while working on the front end alone.

All servers run on one event loop in a background thread, so one engine (started once) serves every
app; apps get it with manage_engine=False. Wrappers (EngineProxy subclasses) change one behaviour of
the shared engine for the error tests without knowing which engine it is."""

from __future__ import annotations

import os

# Without a GPU, Triton kernels run in Triton's interpreter. The variable must be set before the first
# `import triton` anywhere in the session (triton's own helpers are decorated at import time).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Usage ledgers written by test servers go to a throw-away folder, not the user's home.
if "GLM_SERVE_STATE_DIR" not in os.environ:
    import tempfile

    os.environ["GLM_SERVE_STATE_DIR"] = tempfile.mkdtemp(prefix="glm-serve-test-state-")

import asyncio
import importlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.config import CONFIG_DIR, Config, EngineConfig, load_config
from server.engine_api import Delta, GenerateRequest, Load

ENGINE_FACTORY = os.environ.get("GLM_SERVE_TEST_ENGINE", "server.engine:NativeEngine")
ON_VLLM = "vllm" in ENGINE_FACTORY  # make test-vllm: known gaps of the vLLM adapter are xfail there
TEST_PROFILE = CONFIG_DIR / "cpu.yaml"
TEST_ENGINE_OVERRIDES: dict[str, Any] = {"engine.max_model_len": 1024, "engine.max_num_seqs": 64}
API_KEY = "sk-test-key-1"


def load_engine_factory(path: str = ENGINE_FACTORY) -> Callable[[EngineConfig], Any]:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def http_config(**server_overrides: Any) -> Config:
    overrides = dict(TEST_ENGINE_OVERRIDES)
    overrides.update({f"server.{k}": v for k, v in server_overrides.items()})
    return load_config(TEST_PROFILE, overrides)


class LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()

    def submit(self, coro: Any) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Any, timeout: float = 120.0) -> Any:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class ServerHandle:
    app: Any
    server: uvicorn.Server
    future: Future
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def serving(self) -> Any:
        return self.app.state.serving

    def client(self, api_key: str = API_KEY, **kwargs: Any) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def async_client(self, api_key: str = API_KEY, **kwargs: Any) -> Any:
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 60)
        kwargs.setdefault("headers", {"Authorization": f"Bearer {API_KEY}"})
        return httpx.Client(base_url=self.url, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.future.result(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(loop_thread: LoopThread, app: Any, *, wait_ready: bool = True) -> ServerHandle:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    future = loop_thread.submit(server.serve(sockets=[sock]))
    handle = ServerHandle(app, server, future, port)
    deadline = time.monotonic() + 120
    while not server.started or (wait_ready and not app.state.serving.ready):
        if future.done():
            future.result()  # raises what went wrong
        if time.monotonic() > deadline:
            raise TimeoutError("test server did not start")
        time.sleep(0.01)
    return handle


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def engine(loop_thread: LoopThread) -> Iterator[Any]:
    """The shared engine (see ENGINE_FACTORY)."""
    instance = load_engine_factory()(http_config().engine)
    loop_thread.run(instance.start(), timeout=600)
    yield instance
    loop_thread.run(instance.shutdown(), timeout=60)


@pytest.fixture(scope="session")
def make_server(loop_thread: LoopThread, engine: Any) -> Iterator[Callable[..., ServerHandle]]:
    """make_server(engine=None, wait_ready=True, **server_config) -> a running ServerHandle."""
    started: list[ServerHandle] = []

    def make(engine_override: Any = None, wait_ready: bool = True, **server_overrides: Any) -> ServerHandle:
        app = create_app(http_config(**server_overrides), engine_override or engine, manage_engine=False)
        handle = start_server(loop_thread, app, wait_ready=wait_ready)
        started.append(handle)
        return handle

    yield make
    for handle in started:
        handle.stop()


@pytest.fixture(scope="session")
def server(make_server: Callable[..., ServerHandle]) -> ServerHandle:
    """The default server: no API keys, default limits."""
    return make_server()


@pytest.fixture(scope="session")
def glm_server(
    tmp_path_factory: pytest.TempPathFactory,
    loop_thread: LoopThread,
    make_server: Callable[..., ServerHandle],
) -> Iterator[ServerHandle]:
    """A server of the tiny random GLM-5 (backends/models/tiny.py: the GLM-5 architecture, tokenizer and
    chat template) on the native engine, whichever engine the session's other servers use."""
    from backends.models.tiny import write_tiny_glm5
    from server.engine import NativeEngine

    model_dir = write_tiny_glm5(tmp_path_factory.mktemp("glm") / "tiny-glm5")
    cfg = http_config().engine
    cfg.model, cfg.num_kv_blocks, cfg.max_model_len = str(model_dir), 64, 512
    engine = NativeEngine(cfg)
    loop_thread.run(engine.start(), timeout=300)
    yield make_server(engine_override=engine)
    loop_thread.run(engine.shutdown(), timeout=60)


@pytest.fixture()
def client(server: ServerHandle) -> Any:
    return server.client()


# -- engine wrappers for error and load tests -------------------------------------------------------
class EngineProxy:
    """Delegates everything to the shared engine; subclasses change one behaviour."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, request: GenerateRequest) -> Any:
        return self._inner.generate(request)

    def load(self) -> Load:
        return self._inner.load()

    def healthy(self) -> bool:
        return self._inner.healthy()


class QueueFullEngine(EngineProxy):
    def __init__(self, inner: Any, num_waiting: int) -> None:
        super().__init__(inner)
        self.num_waiting = num_waiting

    def load(self) -> Load:
        real = self._inner.load()
        return Load(real.num_running, self.num_waiting, real.kv_usage, 3.0, real.gen_tokens_per_s)


class DeadEngine(EngineProxy):
    def healthy(self) -> bool:
        return False


class FailingEngine(EngineProxy):
    """Fails with a bug-like exception after `after` deltas (0: before any output)."""

    SECRET = "secret-internal-detail-42"

    def __init__(self, inner: Any, after: int) -> None:
        super().__init__(inner)
        self.after = after

    async def generate(self, request: GenerateRequest) -> Any:
        produced = 0
        stream = self._inner.generate(request)
        try:
            async for delta in stream:
                if produced >= self.after:
                    raise RuntimeError(self.SECRET)
                produced += 1
                yield delta
        finally:
            await stream.aclose()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, matched by name and a subset of labels."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample_name = head.split("{", 1)[0]
        if sample_name != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def delta_text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


@pytest.fixture(params=["thread", "process"])
def core_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test twice: tests.engine_helpers.start_engine puts the engine core in a thread of the test
    process, then in a process of its own (engine.core_process)."""
    from tests import engine_helpers

    monkeypatch.setattr(engine_helpers, "CORE_PROCESS", request.param == "process")
    return request.param


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Tiny models run several times faster on one intra-op thread; model test modules use it for all their
    tests (pytestmark = pytest.mark.usefixtures("single_torch_thread"))."""
    from tests.engine_helpers import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def glm_tokenizer() -> Any:
    """A byte-level BPE tokenizer that knows GLM's special tokens (backends/models/tiny.py)."""
    from backends.models.tiny import build_glm_tokenizer

    return build_glm_tokenizer()
