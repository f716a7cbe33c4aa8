"""What saving and loading a Hugging Face PEFT adapter directory share: names, errors, the torch layout.

A PEFT LoRA directory is ``adapter_config.json`` + ``adapter_model.safetensors``
whose tensors are named ``base_model.model.<module>.lora_A.weight`` (``(r, in)``)
and ``...lora_B.weight`` (``(out, r)``), per PyTorch module. ``jlora.peft._save``
writes it, ``jlora.peft._load`` reads it, ``jlora.peft._variants`` holds the
variants' own tensors and configs (DoRA, AdaLoRA, PiSSA/OLoRA).
"""

from __future__ import annotations

import itertools
import json
import re
import struct

import jax
import numpy as np

from jlora._weight import LoraWeight

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Key of the base model's jlora.fingerprint in the safetensors header's __metadata__ (free-form
# strings that PEFT, vLLM and safetensors ignore; adapter_config.json must stay PEFT-only).
FINGERPRINT_KEY = "jlora_base_fingerprint"
# A tensor of an adapter directory: its module, kind (lora_A, ...), optional adapter name and suffix.
TENSOR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_E|lora_embedding_A|"
                        r"lora_embedding_B|lora_magnitude_vector)(?:\.(?P<adapter>[^.]+))?(?P<suffix>\.weight)?$")


class PeftFormatError(ValueError):
  """A PEFT directory jlora cannot load faithfully (the message says what and why)."""


class UnverifiedBaseWarning(UserWarning):
  """A PEFT adapter without a recorded base fingerprint: loading it onto the wrong base goes unnoticed."""


def torch_factors(w: LoraWeight) -> list[tuple[tuple[int, ...], np.ndarray, np.ndarray]]:
  """Per stacked index: (index, lora_A (r, in), lora_B (out, r)) as float32 NumPy arrays."""
  spec = w.spec
  a = np.asarray(jax.device_get(w.a), np.float32)
  b = np.asarray(jax.device_get(w.b), np.float32)
  nb = len(spec.batch_axes)
  batch_shape = a.shape[:nb]
  out = []
  for idx in itertools.product(*(range(n) for n in batch_shape)):
    ai = a[idx].reshape(-1, spec.rank)  # (in_prod, r), row-major over the input axes
    bi = b[idx].reshape(spec.rank, -1)  # (r, out_prod)
    out.append((idx, np.ascontiguousarray(ai.T), np.ascontiguousarray(bi.T)))
  return out


def write_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> str:
  """``safetensors.numpy.save_file`` with the ``__metadata__`` keys in sorted order: the same adapter
  gives the same bytes in every process (safetensors writes them in a hash map's per-process order).

  Only the header's key order changes, so its length and every data offset stay as written.
  """
  from safetensors.numpy import save_file

  save_file(tensors, path, metadata=metadata)
  with open(path, "r+b") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    raw = f.read(length)
    header = json.loads(raw)
    if "__metadata__" in header:
      header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    canonical += b" " * (length - len(canonical))  # safetensors pads the header with spaces
    if len(canonical) != length:  # (a different JSON spelling: keep safetensors' own bytes)
      return path
    f.seek(8)
    f.write(canonical)
  return path
