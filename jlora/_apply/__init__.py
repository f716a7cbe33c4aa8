"""The apply path: ``jlora.wrap`` re-evaluates a traced function with a separate low-rank path.

From the top down:

* ``wrap``: ``jlora.wrap`` and ``jlora.infer_layout``: trace the function to a
  jaxpr, put ``LowRank`` values in place of the LoRA kernels, evaluate;
* ``evaluator``: the ``Interpreter`` that evaluates a jaxpr and dispatches
  every equation that reads a LoRA kernel to a rule;
* ``rules`` (the table), ``rules_structural``, ``rules_consumers``,
  ``rules_control``: what happens to a kernel at each primitive;
  ``base_result`` and ``equations`` are what the rules share;
* ``consumers``: the low-rank term where a kernel is consumed, and the custom
  VJPs that decide what a train step saves (see its docstring);
* ``context``: the contract between the two sides, what a consumer may ask of
  the interpreter;
* ``lowrank``: the ``LowRank`` value (base + labelled factors) and its labels;
  ``recompute``: which layer inputs the backward pass rebuilds instead of saving.

See docs/design.md ("The apply path") and docs/architecture.md.
"""
