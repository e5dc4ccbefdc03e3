"""FAKE vendor modules for CPU tests: plain-torch implementations of the DOCUMENTED semantics of torch_npu's
and torch_mlu_ops' attention ops (argument names, layouts, length conventions, and the documented constraints,
checked loudly). They contain no vendor code and say nothing about the real ops' numerics or speed; they
exist so that tests can check that glm_kernels/ascend.py and glm_kernels/cambricon.py pass the right layouts and
lengths. Install one with `install_fake(monkeypatch, "torch_npu")`."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

FAKES = {
    "torch_npu": "tests.fakes.torch_npu",
    "torch_mlu": "tests.fakes.torch_mlu",
    "torch_mlu_ops": "tests.fakes.torch_mlu_ops",
}


def install_fake(monkeypatch, name: str) -> ModuleType:
    """Make `import <name>` return the fake for the rest of the test."""
    module = importlib.import_module(FAKES[name])
    monkeypatch.setitem(sys.modules, name, module)
    return module
