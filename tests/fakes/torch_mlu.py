"""FAKE torch_mlu for CPU tests - NOT Cambricon code: an empty stand-in so that `import torch_mlu` and the
registry's availability check succeed. It registers no device."""
