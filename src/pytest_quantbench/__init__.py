"""pytest-quantbench: quantization regression testing of GGUF models.

Every (tensor, qtype) pair of a GGUF model becomes a pytest item that quantizes
that one tensor with ik_llama.cpp and measures PPL and KL-divergence against the
baseline model's logits, exactly as ``llama-perplexity --kl-divergence`` does.

This package module stays import-light: the pytest11 entry point is
:mod:`pytest_quantbench.plugin`, which imports numpy and the engine lazily.
"""

__version__ = "0.1.0"
