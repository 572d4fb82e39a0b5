"""How (token, choice) rows reach experts and come back: the dropless sort and the capacity
slots, SwiGLU over grouped or slotted rows, and the backends (registry.py) that run the
routed experts: XLA loops, a C++ XLA FFI kernel for CPU, Pallas kernels for TPU."""
