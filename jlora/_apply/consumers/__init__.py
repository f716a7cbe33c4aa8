"""The consumers: the low-rank term where a LoRA kernel is consumed (matmul, convolution, lookup,
grouped matmul of routed experts).

Each computes the *scaled low-rank term* to add to the base result from the
layer input and the factors only (``x·A`` first, then ``·B``); the dense
``W0 + scale·B·A`` is never formed.

* ``plans``: how a matmul consumes a kernel (labels of its input and result,
  which factor first);
* ``contraction``: the two-step contraction on labels, in plain ``lax``;
* ``custom_vjp``: the same under custom VJPs that decide what a train step
  saves and recomputes; groups of layers that read one input; the materialised
  layer output;
* ``layer_input``: LoRA dropout and the factors' dtype;
* ``conv``, ``gather``: the terms of a convolution and of an embedding lookup;
* ``ragged``: routed experts, the term of ``jax.lax.ragged_dot`` (two grouped
  matmuls with the model's group sizes) and its custom VJP;
* ``plain``: plain LoRA's rules (``jlora.Variant``'s defaults) from the above.

Everything here reads the interpreter only through ``jlora._apply.context``.
"""
