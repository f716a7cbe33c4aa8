"""``jlora.wrap`` and ``jlora.infer_layout``: trace once, then re-evaluate with LoRA."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from jlora._apply.evaluator import Interpreter, OnUnsupported
from jlora._apply.lowrank import LowRank, Source
from jlora._config import KernelLayout
from jlora._errors import LoraApplyError
from jlora._lazy import is_lazy_node, lazy_of, placeholder
from jlora._tree import is_array_like, path_str
from jlora._weight import is_lora_weight, is_node


def _trace(fn: Callable, args: tuple, kwargs: dict, *, is_kernel: Callable[[tuple, Any], bool]):
  """Traces ``fn(*args, **kwargs)`` to a jaxpr with array leaves as inputs.

  Returns the closed jaxpr, the dynamic input values, the positions (in the
  dynamic inputs) of kernels selected by ``is_kernel`` with their paths and
  leaves, and a function that unflattens the outputs.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_node)
  leaves = [leaf for _, leaf in flat]
  dyn_pos, dyn_vals, kernels = [], [], []
  for i, (path, leaf) in enumerate(flat):
    if is_lora_weight(leaf):
      if not leaf.is_complete:
        raise LoraApplyError(
            f"jlora.wrap: {_arg_path(path)!r} is a LoraWeight with a missing part "
            f"({leaf!r}); the wrapped function needs the full tree: use "
            "jlora.combine(adapters, frozen) first."
        )
      kernels.append((len(dyn_vals), _arg_path(path), leaf))
      dyn_pos.append(i)
      dyn_vals.append(placeholder(leaf.w0) if is_lazy_node(leaf.w0) else leaf.w0)
    elif is_lazy_node(leaf):  # a kernel stored in another form (e.g. 4-bit), without adapter
      kernels.append((len(dyn_vals), _arg_path(path), leaf))
      dyn_pos.append(i)
      dyn_vals.append(placeholder(leaf))
    elif is_array_like(leaf) or isinstance(leaf, jax.core.Tracer):
      if is_kernel(path, leaf):
        kernels.append((len(dyn_vals), _arg_path(path), leaf))
      dyn_pos.append(i)
      dyn_vals.append(leaf)
  out_tree: list = []

  def flat_fn(*dyn):
    full = list(leaves)
    for i, val in zip(dyn_pos, dyn):
      full[i] = val
    a, kw = jax.tree_util.tree_unflatten(treedef, full)
    out = fn(*a, **kw)
    out_leaves, tree = jax.tree_util.tree_flatten(out)
    out_tree.append(tree)
    return out_leaves

  closed = jax.make_jaxpr(flat_fn)(*dyn_vals)
  return closed, dyn_vals, kernels, lambda outs: jax.tree_util.tree_unflatten(out_tree[0], outs)


def _arg_path(path) -> str:
  """Path of a leaf inside ``(args, kwargs)``, relative to the argument holding it."""
  # path[0] selects args/kwargs, path[1] the argument; drop both so that paths match
  # those of the params tree the user passed to jlora.init.
  return path_str(path[2:]) if len(path) > 2 else path_str(path)


def wrap(
    fn: Callable,
    *,
    on_unsupported: OnUnsupported = "error",
    fused_expansion: bool | None = None,
) -> Callable:
  """Wraps ``fn`` so that it accepts trees holding ``jlora.LoraWeight`` kernels.

  The wrapped function has ``fn``'s signature plus optional keyword-only
  ``lora_rng``: a PRNG key that turns on LoRA dropout (training; without it
  dropout is off), and ``adapter_ids``: per-example adapter slots for trees
  holding a bank of adapters (``jlora.stack``). Every use of a LoRA kernel computes
  ``x·W0 + scale·((x·A)·B)`` — the base result from the frozen kernel plus a
  separate low-rank path; the dense ``W0 + scale·B·A`` is never built.

  It works for any JAX function: Flax linen ``apply``, NNX through
  ``nnx.merge``, Hugging Face Flax models' ``module.apply``, and plain
  functions, under ``jit``, ``grad``, ``vmap``, ``scan`` and ``remat``.
  Matmuls (any contraction, including kernels stored or used transposed),
  convolutions and embedding lookups are served. Any other use raises
  ``LoraApplyError`` unless ``on_unsupported="merge"`` explicitly allows
  building the merged kernel for that use.

  Args:
    fn: the function to wrap.
    on_unsupported: ``"error"`` (default) or ``"merge"``.
    fused_expansion: how the low-rank term of a matmul is lowered. ``None``
      (default): on the CPU backend, under a custom VJP that saves no layer
      input it can rebuild from values the model's own backward pass keeps
      anyway, redraws dropout masks from their key instead of saving them,
      materialises each adapted layer's output once and serves layers that
      read one input (q/k/v, gate/up) with one ``x·A`` matmul (docs/design.md,
      "The train step at the floor"); plain autodiff on other backends. ``True``:
      that custom VJP on any backend, with the rank-r expansions ``t·B`` /
      ``dt·Aᵀ`` emitted as fused multiply-adds (ranks <= 16). ``False``: plain
      autodiff. Forward-mode AD (``jax.jvp``) does not pass a custom VJP: set
      ``False`` to differentiate the wrapped function with jvp.

  Returns:
    The wrapped function.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((4, 3))}
    >>> f = lambda p, x: x @ p["w"]
    >>> lp = jlora.init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets="w"))
    >>> jlora.wrap(f)(lp, jnp.ones((1, 4))).shape
    (1, 3)
  """
  if on_unsupported not in ("error", "merge"):
    raise ValueError(f"jlora.wrap: on_unsupported must be 'error' or 'merge', got {on_unsupported!r}.")
  if fused_expansion not in (None, True, False):
    raise ValueError(f"jlora.wrap: fused_expansion must be None, True or False, got {fused_expansion!r}.")

  @functools.wraps(fn)
  def wrapped(*args, lora_rng: jax.Array | None = None, adapter_ids: jax.Array | None = None, **kwargs):
    closed, dyn_vals, kernels, unflatten = _trace(fn, args, kwargs, is_kernel=lambda p, x: False)
    inputs = list(dyn_vals)
    for index, (pos, path, node) in enumerate(kernels):
      if is_lora_weight(node):
        base = lazy_of(node.w0) if is_lazy_node(node.w0) else node.w0
        inputs[pos] = LowRank.from_weight(node, base, Source(path, node.spec, index))
      else:
        inputs[pos] = LowRank.frozen(lazy_of(node), Source(path, None, index))
    custom_vjp = jax.default_backend() == "cpu" if fused_expansion is None else fused_expansion
    context = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
    interp = Interpreter(mode="lora", on_unsupported=on_unsupported, rng=lora_rng, usages={},
                         fused_expansion=bool(fused_expansion), custom_vjp=custom_vjp, context=context)
    outs = interp.run(closed.jaxpr, closed.consts, inputs)
    return unflatten(interp.finish(outs))

  return wrapped


def infer_layout(fn: Callable, params: Any, *args: Any, **kwargs: Any) -> dict[str, KernelLayout]:
  """Finds how ``fn(params, *args, **kwargs)`` uses each parameter as a kernel.

  Traces ``fn`` abstractly (no FLOPs) and, for every parameter with at least
  two axes that reaches a matmul, convolution or lookup, reports which of its
  axes are contracted with the input (``in_axes``), which are stacked-layer
  axes (sliced by ``scan`` or indexing, or batch axes of the matmul) and
  whether it is an embedding table. Pass the result to ``jlora.init``.

  Args:
    fn: a function taking the parameter tree first.
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
    *args: example inputs (shapes matter, values do not).
    **kwargs: example keyword inputs.

  Returns:
    ``{path: KernelLayout}`` for every parameter used as a kernel.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"w": jnp.ones((3, 4))}  # stored (out, in), used transposed
    >>> jlora.infer_layout(lambda p, x: x @ p["w"].T, params, jnp.ones((2, 4)))
    {'w': KernelLayout(in_axes=(1,), batch_axes=(), embedding=False)}
  """

  def is_param_kernel(path, leaf) -> bool:
    # (args, kwargs) -> args -> first positional argument (the params tree)
    in_params = len(path) >= 2 and path[0] == jax.tree_util.SequenceKey(0) and path[1] == jax.tree_util.SequenceKey(0)
    return in_params and len(getattr(leaf, "shape", ())) >= 2

  closed, dyn_vals, kernels, _ = _trace(fn, (params, *args), kwargs, is_kernel=is_param_kernel)
  usages: dict = {}

  def interpret(*vals):
    inputs = list(vals)
    for index, (pos, path, leaf) in enumerate(kernels):
      if is_lora_weight(leaf):
        raise ValueError("jlora.infer_layout takes the original params, not a tree with adapters.")
      inputs[pos] = LowRank.probe(vals[pos], Source(path, None, index))
    interp = Interpreter(mode="probe", on_unsupported="error", rng=None, usages=usages)
    return interp.finish(interp.run(closed.jaxpr, closed.consts, inputs))

  jax.make_jaxpr(interpret)(*dyn_vals)  # abstract: no FLOPs are spent
  results: dict[str, KernelLayout] = {}
  for path, uses in usages.items():
    lay = _layout_from_uses(uses)
    if lay is not None:
      results[path] = lay
  return results


def _layout_from_uses(uses: list[dict]) -> KernelLayout | None:
  kernel_uses = [u for u in uses if u["kind"] in ("dot", "conv", "gather")]
  if not kernel_uses:
    return None
  gathers = [u for u in kernel_uses if u["kind"] == "gather"]
  u = gathers[0] if gathers else kernel_uses[0]
  if not u["in"]:
    return None
  batch = tuple(a for a in u["batch"] if a not in u["in"])
  return KernelLayout(in_axes=u["in"], batch_axes=batch, embedding=bool(gathers))
