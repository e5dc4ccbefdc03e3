"""glm_kernels/registry.py: names -> lazily imported attention backends; clear config errors; checks that import
nothing."""

from __future__ import annotations

import ast
import importlib.util
import sys

import pytest

from glm_kernels.backend import KvLayout, MlaLayout
from glm_kernels.reference import ReferenceBackend
from glm_kernels.registry import (
    ATTENTION_KERNELS,
    AttentionKernelError,
    KernelSpec,
    available_kernels,
    check_attention_kernel,
    get_attention_backend,
    preferred_kernel,
)
from tests.fakes import install_fake


def top_level_classes(module: str) -> set[str]:
    """Classes a module defines, read from its source without importing it (no triton, no vendor)."""
    origin = importlib.util.find_spec(module).origin
    with open(origin) as f:
        tree = ast.parse(f.read())
    return {node.name for node in tree.body if isinstance(node, ast.ClassDef)}


@pytest.mark.parametrize("name", list(ATTENTION_KERNELS))
def test_every_entry_names_an_existing_backend_class(name):
    module, _, cls = ATTENTION_KERNELS[name].backend.partition(":")
    assert cls in top_level_classes(module), ATTENTION_KERNELS[name].backend


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(AttentionKernelError) as err:
        check_attention_kernel("flashinfer", "cpu")
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "unknown engine.attention_kernel 'flashinfer'" in message
    assert "available on cpu: reference" in message
    assert "known: reference, cpu, triton, ascend, cambricon" in message


def test_wrong_device_is_a_clear_error():
    with pytest.raises(AttentionKernelError, match="'ascend' is not available on cuda:0: it runs on npu"):
        check_attention_kernel("ascend", "cuda:0")


def test_missing_vendor_library_is_a_clear_error():
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    with pytest.raises(
        AttentionKernelError, match="needs the Python module.* torch_npu.*available on npu: reference"
    ):
        check_attention_kernel("ascend", "npu")


def test_block_size_constraint(monkeypatch):
    install_fake(monkeypatch, "torch_npu")
    check_attention_kernel("ascend", "npu", block_size=128)
    with pytest.raises(AttentionKernelError, match=r"engine.block_size in \(128\), not 16"):
        check_attention_kernel("ascend", "npu", block_size=16)
    assert available_kernels("npu", block_size=16) == ["reference"]


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(AttentionKernelError, match="it runs on cuda, not cpu"):
        check_attention_kernel("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_attention_kernel("triton", "cpu")
    assert "triton" in available_kernels("cuda")


def test_reference_resolves_to_the_reference_backend():
    backend = get_attention_backend("reference", "cpu")
    assert type(backend) is ReferenceBackend and backend.name == "reference"
    assert (backend.kv_layout, backend.mla_layout) == (KvLayout.BLOCK_MAJOR, MlaLayout.JOINT)


def test_vendor_entries_resolve_with_their_library_present(monkeypatch):
    """Each backend's layouts are its class's: the Ascend one splits the MLA cache, the Cambricon one allocates
    head-major GQA caches (what torch_mlu_ops reads)."""
    install_fake(monkeypatch, "torch_npu")
    install_fake(monkeypatch, "torch_mlu")
    install_fake(monkeypatch, "torch_mlu_ops")
    ascend = get_attention_backend("ascend", "npu:0", block_size=128)
    assert type(ascend).__module__ == "glm_kernels.ascend" and ascend.name == "ascend"
    assert (ascend.kv_layout, ascend.mla_layout) == (KvLayout.BLOCK_MAJOR, MlaLayout.SPLIT)
    cambricon = get_attention_backend("cambricon", "mlu")
    assert (cambricon.kv_layout, cambricon.mla_layout) == (KvLayout.HEAD_MAJOR, MlaLayout.JOINT)
    assert cambricon.kv_layout.value == "[num_blocks, kv_heads, block_size, dim]"


def test_availability_check_imports_nothing(monkeypatch, tmp_path):
    """find_spec only: a vendor module that would blow up on import is never imported by the check."""
    (tmp_path / "exploding_vendor.py").write_text("raise RuntimeError('imported!')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = KernelSpec(
        "glm_kernels.reference:ReferenceBackend", devices=("npu",), requires=("exploding_vendor",)
    )
    monkeypatch.setitem(ATTENTION_KERNELS, "exploding", spec)
    assert "exploding" in available_kernels("npu")
    check_attention_kernel("exploding", "npu")
    assert "exploding_vendor" not in sys.modules


def test_preferred_kernel_for_auto(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert preferred_kernel("cpu") == "cpu"  # a compiler and ninja are here
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert preferred_kernel("cpu") == "reference"  # no compiler: the plain-torch kernel
    monkeypatch.undo()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    install_fake(monkeypatch, "torch_npu")
    assert preferred_kernel("npu", block_size=128) == "ascend"
    assert preferred_kernel("npu", block_size=16) == "reference"  # FIA's paged prefill needs 128
