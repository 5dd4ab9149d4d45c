"""The CPU speed work: what makes training on XLA:CPU fast, kept apart from the plain Flax models.

- `conv`: the fast path of the convolutions (custom VJPs, 1x1 matmuls, Winograd), chosen per
  convolution in `models/layers.py`, and `prepare`/`describe` for a run;
- `winograd`: Winograd's minimal filtering, F(2x2, 3x3) and F(3x3, 2x2);
- `native` (with `native.cc`): its tile transforms as C++ XLA FFI custom calls;
- `malloc`: glibc malloc tunables that spare XLA:CPU a page fault per temporary page per step.

Nothing is imported here: the command-line entry points load `malloc` and restart the process
before JAX is imported.
"""
