"""jlora: LoRA as a pure transform over JAX parameter pytrees.

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.ones((8, 8))}}
  >>> lp = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=".*/kernel"))
  >>> y = jlora.wrap(lambda p, x: x @ p["dense"]["kernel"])(lp, jnp.ones((1, 8)))
"""

from jlora._apply.wrap import infer_layout
from jlora._apply.wrap import wrap
from jlora._checkpoint import AdapterMismatchError
from jlora._checkpoint import fingerprint
from jlora._checkpoint import load_adapter
from jlora._checkpoint import read_adapter_metadata
from jlora._checkpoint import save_adapter
from jlora._config import KernelLayout
from jlora._config import LoraConfig
from jlora._config import Rule
from jlora._count import ParamCount
from jlora._targets import TargetsNote
from jlora._count import count
from jlora._grad import grad
from jlora._grad import value_and_grad
from jlora._errors import LoraApplyError
from jlora._init import init
from jlora._merge import merge
from jlora._merge import unload
from jlora._optim import optimizer
from jlora._partition import combine
from jlora._partition import labels
from jlora._partition import split
from jlora._partition import trainable_mask
from jlora._variant import Variant
from jlora._weight import LoraSpec
from jlora._weight import LoraWeight
from jlora.memory import memory_report
from jlora.multi import Bank
from jlora.multi import compose
from jlora.multi import lorahub
from jlora.multi import stack
from jlora.quant import NF4Weight
from jlora.quant import dequantize
from jlora.quant import merge_quantized
from jlora.quant import quantize
from jlora.variants import AdaLoRA
from jlora.variants import DoRA
from jlora.variants import adalora
from jlora.variants import adalora_finalize
from jlora.variants import extract
from jlora.variants import orthogonality_penalty
from jlora.variants import to_lora

__version__ = "0.1.0"

__all__ = [
    "AdaLoRA",
    "AdapterMismatchError",
    "Bank",
    "DoRA",
    "KernelLayout",
    "LoraApplyError",
    "LoraConfig",
    "LoraSpec",
    "LoraWeight",
    "NF4Weight",
    "ParamCount",
    "Rule",
    "TargetsNote",
    "Variant",
    "adalora",
    "adalora_finalize",
    "combine",
    "compose",
    "count",
    "dequantize",
    "extract",
    "fingerprint",
    "grad",
    "infer_layout",
    "init",
    "labels",
    "load_adapter",
    "lorahub",
    "memory_report",
    "merge",
    "merge_quantized",
    "optimizer",
    "orthogonality_penalty",
    "quantize",
    "read_adapter_metadata",
    "save_adapter",
    "split",
    "stack",
    "to_lora",
    "trainable_mask",
    "unload",
    "value_and_grad",
    "wrap",
]
