"""Everything that touches ik_llama.cpp: ctypes bindings, model load and chunk evaluation,
llama-quantize runs, and the engine's identity. Only this package knows ctypes."""
