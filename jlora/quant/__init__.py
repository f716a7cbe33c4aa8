"""QLoRA: frozen kernels in bitsandbytes' 4-bit NF4 format (double quantization included).

``jlora.quantize`` replaces kernels with ``NF4Weight`` pytree nodes holding
exactly bitsandbytes' bytes; ``jlora.wrap`` decodes each at its use (inside the
consumer, recomputed for the backward pass), ``jlora.init`` puts adapters over
them (``init="loftq"`` fits the quantization error), ``jlora.merge`` folds them
into dense kernels (``merge_quantized`` back into 4 bits), and the state dicts of
pre-quantized Hugging Face ``*-bnb-4bit`` checkpoints convert both ways
(``from_bnb`` / ``to_bnb``).

Example:
  >>> import jax, jax.numpy as jnp, jlora
  >>> params = {"dense": {"kernel": jnp.ones((128, 64))}}
  >>> qp = jlora.quantize(params, targets=".*/kernel")
  >>> lp = jlora.init(jax.random.key(0), qp, jlora.LoraConfig(rank=4, targets=".*/kernel"))
  >>> jlora.wrap(lambda p, x: x @ p["dense"]["kernel"])(lp, jnp.ones((2, 128))).shape
  (2, 64)
"""

from jlora.quant._api import dequantize
from jlora.quant._api import quantize
from jlora.quant._api import storage_bits
from jlora.quant._bnb import from_bnb
from jlora.quant._bnb import is_bnb_4bit
from jlora.quant._bnb import quant_state_keys
from jlora.quant._bnb import stack
from jlora.quant._bnb import to_bnb
from jlora.quant._format import NF4Format
from jlora.quant import _fingerprint  # noqa: F401  (registers jlora.fingerprint's kernel digest)
from jlora.quant import _loftq  # noqa: F401  (registers LoraConfig(init="loftq[_N]"))
from jlora.quant._merge import RoundingError
from jlora.quant._merge import merge_quantized
from jlora.quant._weight import NF4Weight

__all__ = [
    "NF4Format",
    "NF4Weight",
    "RoundingError",
    "dequantize",
    "from_bnb",
    "is_bnb_4bit",
    "merge_quantized",
    "quant_state_keys",
    "quantize",
    "stack",
    "storage_bits",
    "to_bnb",
]
