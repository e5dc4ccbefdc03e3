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

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from glm_kernels import reference
from glm_kernels.reference import AttentionMetadata

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
    """One build per torch installation and CPU: the kernel is compiled for -march=native, so a cache
    directory shared by machines of different CPUs (or baked into an image) must not hand one CPU's build to
    another; and two environments (.venv, .venv-vllm) sharing it would otherwise rebuild it in turn, since the
    builder's hash covers torch's include paths."""
    import hashlib

    from backends.loader import cache_dir

    version = torch.__version__.replace("+", "_")
    key = " ".join([str(Path(torch.__file__).resolve().parent), *sorted(_cpu_flags())])
    cpu = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir(cache) / "kernels" / f"cpu_paged_torch{version}_{cpu}"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, arm64
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import platform

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


def paged_attention(
    q: torch.Tensor,  # [T, heads, dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """glm_kernels/reference.py's paged_attention, computed without gathering decode tokens' context."""
    if k_cache.dtype != q.dtype:  # a KV-cache dtype other than the compute dtype: the C++ kernel has one
        return reference.paged_attention(q, k_cache, v_cache, meta, scale)
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])
    rows = meta.rows
    if rows.decode_tokens.numel():
        out[rows.decode_tokens] = paged_decode(
            q[rows.decode_tokens], k_cache, v_cache, rows.decode_tables, rows.decode_lens, scale
        )
    for first, start, q_len, table in rows.prefill:
        seq_len = start + q_len
        qs = q[first : first + q_len].transpose(0, 1)[None]  # [1, heads, q_len, dim]
        ks = _context(k_cache, table, seq_len, meta.block_size)
        vs = _context(v_cache, table, seq_len, meta.block_size)
        mask = rows.masks.get(first)
        if start and mask is None:  # query i sits at position start + i: bottom-right aligned causal mask
            mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril(diagonal=start)
            rows.masks[first] = mask  # the step's other layers reuse it
        o = F.scaled_dot_product_attention(
            qs,
            ks,
            vs,
            attn_mask=mask,
            is_causal=not start,
            scale=scale,
            enable_gqa=qs.shape[1] != ks.shape[1],
        )
        out[first : first + q_len] = o[0].transpose(0, 1)
    return out


def _context(cache: torch.Tensor, table: list[int], seq_len: int, block_size: int) -> torch.Tensor:
    """[1, kv_heads, seq_len, dim] of one request's cached tokens."""
    blocks = cache[table[: (seq_len + block_size - 1) // block_size]]
    return blocks.flatten(0, 1)[:seq_len].transpose(0, 1)[None]
