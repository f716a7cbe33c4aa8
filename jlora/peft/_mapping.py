"""Flax parameter paths <-> PyTorch module names, built in for transformers' Flax models."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from jlora._config import KernelLayout

# transformers' Flax models use the PyTorch module tree with "/" for "." and a final
# kernel/embedding leaf; GPT-2's Conv1D kernels are stored (out, in) in Flax.
_TRANSPOSED_BY_MODEL_TYPE = {
    "gpt2": r"(.*/)?(c_attn|c_proj|c_fc|q_attn)/kernel",
}
# Model types whose input embedding is tied to the output projection by default.
_TIED_EMBEDDING_BY_MODEL_TYPE = {
    "gpt2": r"(.*/)?wte/embedding",
    "gemma": r"(.*/)?embed_tokens/embedding",
    "gemma2": r"(.*/)?embed_tokens/embedding",
}
KNOWN_MODEL_TYPES = ("gpt2", "llama", "mistral", "gemma", "gemma2", "qwen2", "gpt_neo", "gptj", "opt")


def _default_module_name(path: str, index: Sequence[int]) -> str:
  parts = path.split("/")
  if parts[-1] not in ("kernel", "embedding", "weight"):
    raise ValueError(f"{path!r}: expected a path ending in /kernel or /embedding")
  if index:
    raise ValueError(f"{path!r} is a stacked (scanned) kernel; give jlora.peft a ModuleMap whose "
                     "to_module(path, index) names each layer's module")
  return ".".join(parts[:-1])


@dataclasses.dataclass(frozen=True)
class ModuleMap:
  """How a model's Flax parameter paths correspond to PyTorch module names.

  Attributes:
    to_module: ``(flax_path, stacked_index) -> torch module name``; the index is
      ``()`` for ordinary kernels and the layer index tuple for each slice of a
      stacked (scanned) kernel.
    transposed: regex (fullmatch) of 2-D Flax kernels stored ``(out, in)``
      (GPT-2's Conv1D), used on import to lay out A and B; ``None`` = none.
    fan_in_fan_out: value written to PEFT's ``fan_in_fan_out`` (True for
      PyTorch ``Conv1D`` layers, which store ``(in, out)``).
    tied_embedding: regex of an input embedding tied to the output projection.
      jlora adapts both uses of a tied matrix (so unmerged equals merged); PEFT
      adapts only the lookup, so such adapters are refused on export.
    fused_experts: regex of stacked routed-expert kernels (``[layers, experts, in,
      out]``, the expert axis the last stacked axis) whose PyTorch counterpart is one
      3-D parameter ``[experts, in, out]`` per layer (gpt-oss's
      ``mlp.experts.gate_up_proj``): they are PEFT ``target_parameters``, and
      ``to_module(path, layer_index)`` names the *parameter* (``"model.layers.0.mlp.
      experts.gate_up_proj"``). Per-expert ``nn.Linear`` experts (Mixtral, Qwen-MoE on
      transformers 4.x) are ordinary modules: ``to_module(path, (layer, expert))``.
    parameter_order: the order of a module's parameters in PyTorch, which is the
      order PEFT nests the wrappers of several targeted parameters of one module in
      (gpt-oss's experts: ``gate_up_proj`` inside, ``down_proj`` outside).

  Example:
    >>> from jlora.peft import ModuleMap
    >>> ModuleMap.for_model_type("llama").to_module("model/layers/0/self_attn/q_proj/kernel", ())
    'model.layers.0.self_attn.q_proj'
  """

  to_module: Callable[[str, Sequence[int]], str] = _default_module_name
  transposed: str | None = None
  fan_in_fan_out: bool = False
  tied_embedding: str | None = None
  fused_experts: str | None = None
  parameter_order: tuple[str, ...] = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")

  def is_fused(self, path: str) -> bool:
    """Whether ``path`` is a routed-expert kernel exported as one 3-D parameter per layer."""
    return bool(self.fused_experts) and re.fullmatch(self.fused_experts, path) is not None

  @classmethod
  def for_model_type(cls, model_type: str | None) -> "ModuleMap":
    """The built-in map for a transformers ``config.model_type`` (same-named modules)."""
    pattern = _TRANSPOSED_BY_MODEL_TYPE.get(model_type or "")
    return cls(transposed=pattern, fan_in_fan_out=pattern is not None,
               tied_embedding=_TIED_EMBEDDING_BY_MODEL_TYPE.get(model_type or ""))

  def layout_for(self, path: str, ndim: int, embedding: bool) -> KernelLayout:
    """The Flax layout of a 2-D kernel, for building adapters from PyTorch tensors."""
    if ndim != 2:
      raise ValueError(f"{path!r}: only 2-D kernels can be imported from PEFT (got {ndim}-D)")
    if embedding:
      return KernelLayout(in_axes=(0,), embedding=True)
    if self.transposed and re.fullmatch(self.transposed, path):
      return KernelLayout(in_axes=(1,))
    return KernelLayout(in_axes=(0,))
