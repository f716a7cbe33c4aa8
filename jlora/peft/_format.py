"""What saving and loading a Hugging Face PEFT adapter directory share: names, errors, the torch layout.

A PEFT LoRA directory is ``adapter_config.json`` + ``adapter_model.safetensors``
whose tensors are named ``base_model.model.<module>.lora_A.weight`` (``(r, in)``)
and ``...lora_B.weight`` (``(out, r)``), per PyTorch module. Routed experts stored
as one 3-D parameter per layer (gpt-oss's ``experts.gate_up_proj`` ``[E, in, out]``)
are PEFT ``target_parameters``: one ``lora_A``/``lora_B`` pair per parameter, with
the experts flattened into the rank axis (``fused_to_torch``; docs/moe.md). ``jlora.peft._save``
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


# -- routed experts stored as one 3-D parameter (PEFT target_parameters) -------------------------

# Where lora_A sits for a 3-D ``[E, in, out]`` parameter; PEFT flattens A expert-major (rows
# ``e·r + k``) and B expert-fastest (columns ``k·E + e``) in both.
#  * "peft_swapped": PEFT 0.21 on transformers 4.x's gpt-oss (no ``is_transposed`` on the experts):
#    PEFT swaps in and out, so lora_A ``[E·r, out]`` sits on the output side and lora_B is ``[in, r·E]``.
#  * "input_side": transformers >= 5 (experts marked ``is_transposed``) and vLLM's FusedMoE3DWithLoRA:
#    lora_A ``[E·r, in]``, lora_B ``[out, r·E]``.
FUSED_LAYOUTS = ("peft_swapped", "input_side")
# safetensors __metadata__ key recording the layout jlora.peft.save wrote.
FUSED_LAYOUT_KEY = "jlora_target_parameters_layout"


def check_fused_layout(layout, where: str) -> str:
  if layout not in FUSED_LAYOUTS:
    raise ValueError(
        f"{where}: fused_layout={layout!r}; routed experts stored as one 3-D parameter (PEFT target_parameters) "
        "need an explicit layout: 'peft_swapped' (what PEFT 0.21 reads and writes on transformers 4.x, lora_A on "
        "the output side) or 'input_side' (transformers >= 5 and vLLM). See docs/moe.md.")
  return layout


def fused_to_torch(a: np.ndarray, b: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
  """``(lora_A, lora_B)`` of one 3-D parameter from ``a [E, in, r]`` and ``b [E, r, out]`` (see ``FUSED_LAYOUTS``)."""
  experts, din, r = a.shape
  dout = b.shape[-1]
  if layout == "input_side":
    return (np.ascontiguousarray(a.transpose(0, 2, 1).reshape(experts * r, din)),
            np.ascontiguousarray(b.transpose(2, 1, 0).reshape(dout, r * experts)))
  return (np.ascontiguousarray(b.reshape(experts * r, dout)),
          np.ascontiguousarray(a.transpose(1, 2, 0).reshape(din, r * experts)))


def fused_from_torch(lora_a: np.ndarray, lora_b: np.ndarray, experts: int, din: int, dout: int,
                     layout: str) -> tuple[np.ndarray, np.ndarray]:
  """``(a [E, in, r], b [E, r, out])`` from one 3-D parameter's ``lora_A``/``lora_B`` (inverse of ``fused_to_torch``)."""
  r = lora_a.shape[0] // experts
  if layout == "input_side":
    return lora_a.reshape(experts, r, din).transpose(0, 2, 1), lora_b.reshape(dout, r, experts).transpose(2, 1, 0)
  return lora_b.reshape(din, r, experts).transpose(2, 0, 1), lora_a.reshape(experts, r, dout)


def fused_shapes(experts: int, r: int, din: int, dout: int, layout: str) -> tuple[tuple, tuple]:
  """The ``(lora_A, lora_B)`` shapes of one 3-D parameter in ``layout``."""
  if layout == "input_side":
    return (experts * r, din), (dout, r * experts)
  return (experts * r, dout), (din, r * experts)


def nesting(module: str, params: list[str], order: tuple[str, ...]) -> dict[str, str]:
  """PEFT's module key of each targeted parameter of one module: wrappers nest in the module's parameter
  order (``order``), the first innermost: ``experts.base_layer`` (gate_up_proj), ``experts`` (down_proj)."""
  rank = {p: (order.index(p) if p in order else len(order), p) for p in params}
  ordered = sorted(params, key=rank.__getitem__)
  return {p: module + ".base_layer" * (len(ordered) - 1 - i) for i, p in enumerate(ordered)}
