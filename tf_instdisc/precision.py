"""Compute precision: the Keras dtype policy that --mixed_precision names, with `auto` decided by the hardware.

Logits, the head and the memory bank stay float32 whatever the policy (instance_discrimination.py).
"""

from __future__ import annotations

import tensorflow as tf

_POLICIES = {"off": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def _cpu_has_bfloat16() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      flags = f.read()
  except OSError:
    return False
  return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_policy(mixed_precision: str) -> str:
  """The Keras dtype policy for --mixed_precision.

  auto: float16 on a GPU; bfloat16 on a TPU or a CPU with bfloat16 units (AVX512-BF16 or AMX); else float32,
  because emulated bfloat16 was 3-4x slower than float32 on a CPU without them (measured on our machines).
  """
  if mixed_precision == "auto":
    if tf.config.list_logical_devices("GPU"):
      return "mixed_float16"
    has_bf16 = tf.config.list_logical_devices("TPU") or _cpu_has_bfloat16()
    return "mixed_bfloat16" if has_bf16 else "float32"
  if mixed_precision not in _POLICIES:
    raise ValueError(f"--mixed_precision: got {mixed_precision!r}, expected off, auto, bfloat16 or float16")
  return _POLICIES[mixed_precision]
