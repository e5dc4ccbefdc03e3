"""The CPU attention kernel: decode tokens through a C++ kernel that reads K/V blocks where they lie in the
paged cache (glm_kernels/csrc/cpu_paged_attention.cpp), prefill chunks through one causal SDPA call per
request without padding.

Why: glm_kernels/reference.py gathers every request's blocks into a padded tensor per layer and group, and pads
a step's prefill chunks to the longest one with an explicit mask (which SDPA's CPU flash kernel cannot skip).
Measured on a 2-core EPYC, SmolLM2 fp32, a decode step of 64 sequences with 200-700 cached tokens: the
gather plus SDPA took two thirds of the step. Same semantics as paged_attention in glm_kernels/reference.py.

The C++ source is compiled once per machine and torch version with torch.utils.cpp_extension (needs a C++
compiler and the `ninja` package) into GLM_SERVE_CACHE_DIR/kernels; later loads take a fraction of a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from glm_kernels import reference
from glm_kernels.backend import GqaCache
from glm_kernels.metadata import AttentionMetadata, StepMetadata, group_step
from glm_kernels.reference import ReferenceBackend

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_paged_attention.cpp"
_lock = threading.Lock()
_loaded = False


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded here."""


def compiler() -> str:
    """The C++ compiler torch.utils.cpp_extension uses: $CXX, else c++."""
    return os.environ.get("CXX", "c++")


def missing_build_tools() -> str | None:
    """What is missing to compile the kernel here, or None."""
    if shutil.which(compiler()) is None:
        return "a C++ compiler (c++ on PATH, or $CXX)"
    try:
        import ninja  # noqa: F401
    except ImportError:
        return "the ninja package (pip install ninja)"
    return None


def vector_flags() -> list[str]:
    """The ATen Vectorized width to compile for: AVX-512 or AVX2 where this x86 CPU has it (the kernel is
    built for -march=native on the machine that runs it), else ATen's portable fallback."""
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if {"avx2", "fma"} <= flags:
        return ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def build_dir(cache: str | None = None) -> Path:
    """Where the kernel is built: under `cache` (the engine's cache_dir; None: its default, as
    backends/loader.py's cache_dir resolves it), one build per torch installation and CPU: the kernel is compiled for -march=native, so a cache
    directory shared by machines of different CPUs (or baked into an image) must not hand one CPU's build to
    another; and two environments (.venv, .venv-vllm) sharing it would otherwise rebuild it in turn, since the
    builder's hash covers torch's include paths."""
    version = torch.__version__.replace("+", "_")
    key = " ".join([str(Path(torch.__file__).resolve().parent), *sorted(_cpu_flags())])
    cpu = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = cache or os.environ.get("GLM_SERVE_CACHE_DIR") or Path.home() / ".cache" / "glm-serve"
    return Path(root) / "kernels" / f"cpu_paged_torch{version}_{cpu}"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, arm64
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {platform.machine(), platform.processor()}


def load(cache: str | None = None) -> None:
    """Compile (first time on this machine) and load the C++ op; idempotent, thread-safe. `cache`: the
    engine's cache_dir (default GLM_SERVE_CACHE_DIR, else ~/.cache/glm-serve)."""
    global _loaded
    with _lock:
        if _loaded:
            return
        missing = missing_build_tools()
        if missing:
            raise KernelBuildError(f"the cpu attention kernel needs {missing}")
        from torch.utils.cpp_extension import load as load_extension

        path = build_dir(cache)
        path.mkdir(parents=True, exist_ok=True)
        _remove_stale_lock(path)
        if not (path / "glm_serve_cpu_paged.so").exists():
            log.info("compiling the cpu attention kernel into %s (once per machine, about 20 s)", path)
        try:
            load_extension(
                name="glm_serve_cpu_paged",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp", *vector_flags()],
                extra_ldflags=["-fopenmp"],
                build_directory=str(path),
                is_python_module=False,
                verbose=False,
            )
        except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError with its output
            raise KernelBuildError(f"could not build the cpu attention kernel in {path}: {exc}") from exc
        _loaded = True
        log.info("cpu attention kernel loaded from %s", path)


def _remove_stale_lock(path: Path, max_age_s: float = 600.0) -> None:
    """torch's builder holds a lock file while it compiles; one left by a killed build would block every later
    load forever. A build takes well under a minute, so a lock older than max_age_s is stale."""
    lock = path / "lock"
    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            log.warning("removing a stale build lock %s", lock)
            lock.unlink()
    except FileNotFoundError:
        pass


def paged_decode(
    q: torch.Tensor,  # [S, heads, dim], one token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    seq_lens: torch.Tensor,  # [S] int32, including the token itself
    scale: float,
) -> torch.Tensor:
    load()
    return torch.ops.glm_serve_cpu.paged_decode(
        q.contiguous(), k_cache, v_cache, block_tables, seq_lens, float(scale)
    )


@dataclass(frozen=True, slots=True)
class CpuMetadata(AttentionMetadata):
    """The groups (MLA and a KV-cache dtype other than the compute dtype run on the reference) and the step
    per request, for walking block tables in place."""

    decode_tokens: torch.Tensor  # [S] rows of the flattened tokens that are decode tokens (q_len 1)
    decode_tables: torch.Tensor  # [S, max_blocks] int32, padded with block 0
    decode_lens: torch.Tensor  # [S] int32: context length including the new token
    prefill: list[PrefillChunk]


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    first: int  # its first row in the flattened tokens
    start: int  # its first position
    q_len: int
    block_table: list[int]
    mask: torch.Tensor | None  # [q_len, start + q_len] bool (bottom-right causal); None: is_causal (start 0)


def build_cpu_metadata(step: StepMetadata) -> CpuMetadata:
    decode = [i for i, q in enumerate(step.query_lens) if q == 1]
    needed = [(step.starts[i] + step.block_size) // step.block_size for i in decode]  # blocks of start + 1
    width = max(needed, default=0)
    tables = [step.block_tables_host[i][:n] + [0] * (width - n) for i, n in zip(decode, needed, strict=True)]
    device = step.device
    prefill = []
    for i, q_len in enumerate(step.query_lens):
        if q_len > 1:
            start = step.starts[i]
            mask = None
            if start:  # query i sits at position start + i: bottom-right aligned causal mask
                mask = torch.ones(q_len, start + q_len, dtype=torch.bool, device=device).tril(diagonal=start)
            prefill.append(
                PrefillChunk(step.query_start_host[i], start, q_len, step.block_tables_host[i], mask)
            )
    return CpuMetadata(
        step,
        group_step(step),
        decode_tokens=torch.tensor(
            [step.query_start_host[i] for i in decode], dtype=torch.long, device=device
        ),
        decode_tables=torch.tensor(tables, dtype=torch.int32, device=device).view(len(decode), width),
        decode_lens=torch.tensor([step.starts[i] + 1 for i in decode], dtype=torch.int32, device=device),
        prefill=prefill,
    )


def paged_attention(
    q: torch.Tensor,  # [T, heads, dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, dim]
    v_cache: torch.Tensor,
    meta: CpuMetadata,
    scale: float,
) -> torch.Tensor:
    """glm_kernels/reference.py's paged_attention, computed without gathering decode tokens' context."""
    if k_cache.dtype != q.dtype:  # a KV-cache dtype other than the compute dtype: the C++ kernel has one
        return reference.paged_attention(q, k_cache, v_cache, meta, scale)
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    if meta.decode_tokens.numel():
        out[meta.decode_tokens] = paged_decode(
            q[meta.decode_tokens], k_cache, v_cache, meta.decode_tables, meta.decode_lens, scale
        )
    block_size = meta.step.block_size
    for chunk in meta.prefill:
        first, q_len, seq_len = chunk.first, chunk.q_len, chunk.start + chunk.q_len
        qs = q[first : first + q_len].transpose(0, 1)[None]  # [1, heads, q_len, dim]
        ks = _context(k_cache, chunk.block_table, seq_len, block_size)
        vs = _context(v_cache, chunk.block_table, seq_len, block_size)
        o = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=scale,
            enable_gqa=qs.shape[1] != ks.shape[1],
        )
        out[first : first + q_len] = o[0].transpose(0, 1)
    return out


def _context(cache: torch.Tensor, table: list[int], seq_len: int, block_size: int) -> torch.Tensor:
    """[1, kv_heads, seq_len, dim] of one request's cached tokens."""
    blocks = cache[table[: (seq_len + block_size - 1) // block_size]]
    return blocks.flatten(0, 1)[:seq_len].transpose(0, 1)[None]


class CpuBackend(ReferenceBackend):
    """The reference's layouts; GQA through the C++ decode kernel and per-request SDPA, MLA as the reference."""

    name: ClassVar[str] = "cpu"

    @classmethod
    def setup(cls, cache_dir: str | None) -> None:
        load(cache_dir)

    def build_metadata(self, step: StepMetadata) -> CpuMetadata:
        return build_cpu_metadata(step)

    def gqa_attention(self, q, cache: GqaCache, meta: CpuMetadata, scale: float) -> torch.Tensor:
        return paged_attention(q, cache.key, cache.value, meta, scale)
