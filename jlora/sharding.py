"""Sharding: adapter specs derived from their base kernels, base-model presets, meshes.

Everything here is a pure function over ``PartitionSpec`` / ``NamedSharding``
trees, for use with ``jax.jit(in_shardings=..., out_shardings=...)``; JAX's own
runtime (a global ``Mesh``, ``jax.distributed``) does the rest.

Adapter rule ("derive", the default): for a kernel with spec ``P(s_0, ..., s_n)``,

* ``A`` (``(*batch, *in, r)``) gets the specs of the batch and input axes and
  ``None`` for the rank axis;
* ``B`` (``(*batch, r, *out)``) gets the batch specs, ``None`` for rank, and the
  specs of the output axes.

So ``x·A`` needs the same collectives as ``x·W0`` and ``(x·A)·B`` produces an
output sharded like ``x·W0``'s. ``"replicate"`` keeps adapters whole on every
device (stacked axes keep their spec).

Routed experts (``layers/mlp/experts/*/kernel``, ``[layers, experts, in, out]``) split
their expert axis over the mesh axis ``expert`` (expert parallelism) in every preset,
on top of the preset's fsdp/tensor split of ``in``/``out``; their adapters
(``A [layers, experts, in, r]``, ``B [layers, experts, r, out]``) take the same expert
and in/out specs by the rule above, so each device holds its experts' adapters.

Kernels stored in another form (``jlora.NF4Weight``) are sharded like the dense
kernel they stand for: a rule matches the node's path and the kernel's spec is
mapped onto the stored arrays by the node's ``__jlora_specs__`` (stacked axes
keep their spec; NF4's ``[out, in/2]`` codes take the kernel's output and input
specs), so ``partition_specs``, ``specs_of``, ``put``, ``lora_specs`` and
``init_sharded`` take quantized trees as they are.

Example:
  >>> from jax.sharding import PartitionSpec as P
  >>> import jlora, jlora.sharding
  >>> spec = jlora.LoraSpec(shape=(64, 32), layout=jlora.KernelLayout(in_axes=(0,)), rank=4, alpha=8.0)
  >>> jlora.sharding.factor_specs(spec, P("fsdp", "tensor"))
  (P('fsdp', None), P(None, 'tensor'))
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jlora import _init
from jlora._lazy import is_lazy_node
from jlora._tree import leaves_with_paths, path_str
from jlora._weight import LoraSpec, is_lora_weight, is_node

Policy = Literal["derive", "replicate"]
Rules = Sequence[tuple[str, P]]
DATA_AXES = ("data", "fsdp")  # the batch is split over these mesh axes
MESH_AXES = ("data", "fsdp", "expert", "tensor")


# -- adapters ---------------------------------------------------------------------------------


def _padded(spec: P, ndim: int) -> tuple:
  entries = tuple(spec)
  if len(entries) > ndim:
    raise ValueError(f"PartitionSpec {spec} has more entries than the kernel has axes ({ndim})")
  return entries + (None,) * (ndim - len(entries))


def _is_spec(x: Any) -> bool:
  return isinstance(x, P) or is_lazy_node(x)


def kernel_spec(s: Any) -> P:
  """The kernel ``PartitionSpec`` of a spec-tree entry (a ``P``, or a quantized node of specs)."""
  if isinstance(s, P):
    return s
  get = getattr(s, "kernel_spec", None)
  spec = get() if get is not None else None
  return spec if spec is not None else P()


def storage_specs(node: Any, spec: P, sizes: Mapping[str, int] | None = None) -> Any:
  """Specs of the stored arrays of a kernel stored in another form, sharded like ``spec``."""
  hook = getattr(type(node), "__jlora_specs__", None)
  if hook is None:  # no sharding rule of its own: keep its arrays whole on every device
    return jax.tree.map(lambda _: P(), node)

  def axis_size(entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return int(np.prod([(sizes or {}).get(e, 1) for e in names if e is not None]))

  return hook(node, spec, axis_size)


def child_specs(spec: LoraSpec, kernel_spec: P, policy: Policy = "derive") -> dict[str, P]:
  """PartitionSpecs of every adapter child (``a``, ``b``, a variant's own) from its kernel's spec.

  A child axis that is a kernel axis takes that axis' spec (``"replicate"``: only stacked
  axes do); rank and other special axes are unsharded.
  """
  if policy not in ("derive", "replicate"):
    raise ValueError(f"policy must be 'derive' or 'replicate', got {policy!r}")
  k = _padded(kernel_spec, len(spec.shape))
  keep = set(range(len(spec.shape))) if policy == "derive" else set(spec.batch_axes)
  return {name: P(*(k[ax] if isinstance(ax, int) and ax in keep else None for ax in axes))
          for name, axes in spec.factor_axes.items()}


def factor_specs(spec: LoraSpec, kernel_spec: P, policy: Policy = "derive") -> tuple[P, P]:
  """``(A spec, B spec)`` for an adapter whose base kernel has ``kernel_spec``."""
  specs = child_specs(spec, kernel_spec, policy)
  return specs["a"], specs["b"]


def lora_specs(params: Any, base_specs: Any, policy: Policy = "derive") -> Any:
  """PartitionSpecs for a LoRA tree, given the specs of its base (plain) parameter tree.

  ``base_specs`` has the structure of the original params (one spec per leaf);
  the result has the structure of ``params`` (``LoraWeight`` nodes get
  ``LoraWeight`` nodes of specs; ``None`` halves from ``jlora.split``
  stay ``None``).
  """
  flat_specs = {p: s for p, s in leaves_with_paths(base_specs, is_leaf=_is_spec)}

  def spec_for(path, leaf):
    p = path_str(path)
    if p not in flat_specs:
      raise ValueError(f"no PartitionSpec for {p!r} in base_specs")
    s = flat_specs[p]
    if is_lora_weight(leaf):
      kids = child_specs(leaf.spec, kernel_spec(s), policy)
      return leaf.replace(w0=None if leaf.w0 is None else s,
                          **{n: None if v is None else kids[n] for n, v in leaf.factors.items()})
    return s

  return jax.tree_util.tree_map_with_path(spec_for, params, is_leaf=is_node)


def specs_of(params: Any) -> Any:
  """The PartitionSpec of every (NamedSharding-placed) array of a plain tree; ``P()`` otherwise."""
  def spec(x):
    sh = getattr(x, "sharding", None)
    return sh.spec if isinstance(sh, NamedSharding) else P()

  base = jax.tree_util.tree_map(lambda x: x.w0 if is_lora_weight(x) else x, params, is_leaf=is_lora_weight)
  return jax.tree.map(spec, base)


def named(specs: Any, mesh: Mesh) -> Any:
  """PartitionSpec tree -> NamedSharding tree."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


# -- base-model presets -----------------------------------------------------------------------

# Column-parallel (output axis split) and row-parallel (input axis split) projections of
# transformers' Flax LLMs. Flax nn.Dense kernels are (in, out); GPT-2's Conv1D kernels (out, in).
_COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj|query_key_value|fc1|c_fc_in)"
_ROW = r"(o_proj|down_proj|dense|fc2|out_proj)"
_EXPERT_COLUMN = r"(gate_proj|up_proj|gate_up_proj)"


def preset_rules(name: str, mesh: Mesh | None = None) -> list[tuple[str, P]]:
  """Ordered (regex, PartitionSpec) rules for ``jlora.models`` and transformers' Flax causal LMs.

  Presets: ``"fsdp"`` (every matrix split along its first axis over ``fsdp``;
  for ``jlora.models``' stacked ``(layers, in, out)`` kernels the input axis, so
  that the scan over layers never gathers the layer axis), ``"tp"`` (Megatron
  column/row parallel over ``tensor``), ``"fsdp_tp"`` (both), ``"replicated"``.
  1-D parameters (norms, biases) and per-layer norm scales are replicated;
  column-parallel biases follow their kernels' output split. In every preset but
  ``"replicated"``, routed experts (``layers/mlp/experts/*``, ``(layers, experts, in,
  out)``) split their expert axis over ``expert`` (expert parallelism; a mesh
  without it, or of size 1, keeps them whole) and their in/out axes like the
  preset's MLP; shared experts are sharded like a dense MLP; routers are replicated.

  Example:
    >>> from jlora.sharding import partition_specs, preset_rules
    >>> import jax.numpy as jnp
    >>> p = {"layers": {"mlp": {"experts": {"up_proj": {"kernel": jnp.zeros((2, 8, 16, 32))}}}}}
    >>> partition_specs(p, preset_rules("fsdp_tp"))["layers"]["mlp"]["experts"]["up_proj"]["kernel"]
    P(None, 'expert', 'fsdp', 'tensor')
  """
  del mesh
  f, t, e = "fsdp", "tensor", "expert"
  if name == "replicated":
    return [(r".*", P())]
  if name == "fsdp":
    # jlora.models' stacked (layers, in, out) kernels: split the input axis, never the layer axis;
    # routed experts (layers, experts, in, out) also split their experts over `expert`.
    return [(r"layers/mlp/experts/[^/]+/kernel", P(None, e, f, None)), (r"layers/mlp/experts/[^/]+/bias", P(None, e)),
            (r"layers/.*/kernel", P(None, f, None)), (r".*/(kernel|embedding)", P(f, None)), (r".*", P())]
  if name not in ("tp", "fsdp_tp"):
    raise ValueError(f"unknown sharding preset {name!r}: use fsdp, tp, fsdp_tp or replicated")
  fs = f if name == "fsdp_tp" else None
  return [
      # Routed experts (layers, experts, in, out): experts over `expert`, column/row parallel within.
      (rf"layers/mlp/experts/{_EXPERT_COLUMN}/kernel", P(None, e, fs, t)),
      (rf"layers/mlp/experts/{_EXPERT_COLUMN}/bias", P(None, e, t)),
      (rf"layers/mlp/experts/{_ROW}/kernel", P(None, e, t, fs)),
      (r"layers/mlp/experts/.*", P(None, e)),
      # Shared experts: a dense MLP.
      (rf"layers/mlp/shared_experts?/{_COLUMN}/kernel", P(None, fs, t)),
      (rf"layers/mlp/shared_experts?/{_ROW}/kernel", P(None, t, fs)),
      # jlora.models (native decoder): stacked (layers, in, out) kernels and (layers, out) biases.
      (rf"layers/(self_attn|mlp)/{_COLUMN}/kernel", P(None, fs, t)),
      (rf"layers/(self_attn|mlp)/{_COLUMN}/bias", P(None, t)),
      (rf"layers/(self_attn|mlp)/{_ROW}/kernel", P(None, t, fs)),
      (r"layers/.*", P()),
      (r"lm_head/kernel", P(fs, t)),
      (r"embed_tokens/embedding", P(t, fs)),
      # GPT-2 Conv1D kernels, stored (out, in): c_attn/c_fc column-, c_proj row-parallel.
      (r".*/(c_attn|c_fc)/kernel", P(t, fs)),
      (r".*/c_proj/kernel", P(fs, t)),
      (rf".*/{_COLUMN}/kernel", P(fs, t)),
      (rf".*/{_ROW}/kernel", P(t, fs)),
      (r".*/(lm_head|embed_out)/kernel", P(fs, t)),
      (r".*/(embed_tokens|wte|wpe|word_embeddings)/embedding", P(t, fs)),
      (r".*/(kernel|embedding)", P(fs, None)),
      (r".*", P()),
  ]


def partition_specs(params: Any, rules: Rules, *, mesh: Mesh | None = None) -> Any:
  """Applies ordered regex rules (fullmatch, first wins) to every parameter path.

  Specs with more entries than a parameter has axes are trimmed to the
  parameter's rank (so one rule covers kernels and, e.g., 1-D scales). With a
  ``mesh``, axes whose size does not divide by the mesh axes are an error.

  Raises:
    ValueError: listing every parameter no rule matched, or a non-divisible axis.
  """
  compiled = [(re.compile(p), s) for p, s in rules]
  unmatched = []
  sizes = dict(mesh.shape) if mesh is not None else {}

  def spec_for(path, leaf):
    p = path_str(path)
    for pat, s in compiled:
      if pat.fullmatch(p):
        ndim = len(getattr(leaf, "shape", ()))
        entries = tuple(s)[:ndim]
        for axis, entry in enumerate(entries):
          names = entry if isinstance(entry, tuple) else (entry,)
          n = int(np.prod([sizes.get(e, 1) for e in names if e is not None]))
          if n > 1 and leaf.shape[axis] % n:
            raise ValueError(
                f"{p!r} (shape {tuple(leaf.shape)}): axis {axis} of size {leaf.shape[axis]} does not split "
                f"over mesh axes {entry!r} ({n} devices); change the mesh or add an earlier rule for it.")
        return storage_specs(leaf, P(*entries), sizes) if is_lazy_node(leaf) else P(*entries)
    unmatched.append(p)
    return storage_specs(leaf, P(), sizes) if is_lazy_node(leaf) else P()

  specs = jax.tree_util.tree_map_with_path(spec_for, params, is_leaf=is_lazy_node)
  if unmatched:
    raise ValueError(f"{len(unmatched)} parameters match no sharding rule: {unmatched[:20]}"
                     + (" ..." if len(unmatched) > 20 else "") + "; add a rule such as ('.*', P()).")
  return specs


# -- meshes and placement -------------------------------------------------------------------------


def make_mesh(shape: str | Mapping[str, int] | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
  """A ``("data", "fsdp", "expert", "tensor")`` mesh; ``"data=2,expert=4"`` style strings; missing axes are 1.

  ``expert`` splits routed experts (expert parallelism, see ``preset_rules``); the batch is
  split over ``data`` and ``fsdp`` only. Default: every device on ``fsdp``. Axes are ``Auto``
  (JAX 0.10's default is Explicit).
  """
  devices = list(devices or jax.devices())
  if isinstance(shape, str) and shape:
    sizes = {}
    for part in shape.split(","):
      k, _, v = part.partition("=")
      if k.strip() not in MESH_AXES or not v.strip().isdigit():
        raise ValueError(f"mesh {shape!r}: write it as data=N,fsdp=N,expert=N,tensor=N")
      sizes[k.strip()] = int(v)
  elif isinstance(shape, Mapping):
    sizes = dict(shape)
  else:
    sizes = {"fsdp": len(devices)}
  unknown = [k for k in sizes if k not in MESH_AXES]
  if unknown:
    raise ValueError(f"mesh {dict(sizes)}: unknown axes {unknown}; the axes are {', '.join(MESH_AXES)}")
  dims = tuple(sizes.get(a, 1) for a in MESH_AXES)
  if int(np.prod(dims)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {int(np.prod(dims))} devices, "
                     f"there are {len(devices)}")
  return jax.make_mesh(dims, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def put(params: Any, specs: Any, mesh: Mesh) -> Any:
  """Places host arrays (the same on every process) onto the global mesh, shard by shard."""
  def place(x, s):
    sharding = NamedSharding(mesh, s)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(place, params, specs, is_leaf=lambda x: isinstance(x, P))


def init_sharded(key: jax.Array, base_params: Any, config: Any, mesh: Mesh, *, layout=None,
                 policy: Policy = "derive") -> Any:
  """``jlora.init`` whose A and B are created directly with their sharding.

  The factors come out of one jitted computation with ``out_shardings``, so
  each device only ever holds its shard; the base arrays are attached as they
  are (no copy).
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params)

  def make(k):  # every child but the base (also non-trained ones, e.g. AdaLoRA's rank mask)
    return jax.tree.map(lambda w: w.replace(w0=None) if is_lora_weight(w) else None,
                        _init.init(k, shapes, config, layout=layout), is_leaf=is_lora_weight)

  abstract = jax.eval_shape(make, key)
  out_specs = lora_specs(abstract, specs_of(base_params), policy)
  adapters = jax.jit(make, out_shardings=named(out_specs, mesh))(key)
  return attach_base(adapters, base_params)


def attach_base(adapters: Any, base_params: Any) -> Any:
  """Puts the base kernels under the adapters of an adapters-only tree (``split(...)[0]``)."""
  weights = {p: w for p, w in leaves_with_paths(adapters, is_leaf=is_lora_weight) if is_lora_weight(w)}

  def attach(path, leaf):
    w = weights.get(path_str(path))
    return leaf if w is None else w.replace(w0=leaf)

  return jax.tree_util.tree_map_with_path(attach, base_params, is_leaf=is_lazy_node)


def batch_from_process_local(local: Mapping[str, np.ndarray], mesh: Mesh, *, axis: int = 1) -> dict:
  """Builds global batch arrays from each process's rows (split over ``data``/``fsdp``)."""
  def one(x):
    spec = [None] * x.ndim
    spec[axis] = DATA_AXES
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(*spec)), np.asarray(x))

  return {k: one(v) for k, v in local.items()}


def collective_bytes(compiled: Any) -> dict[str, int]:
  """Bytes produced by each collective kind in a compiled XLA program (from its HLO text)."""
  text = compiled.as_text()
  kinds = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
  out = {k: 0 for k in kinds}
  dtype_bytes = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s8": 1, "u8": 1, "pred": 1}
  for line in text.splitlines():
    m = re.search(r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                  r"(-start)?\(", line)
    if not m:
      continue
    for dt, dims in re.findall(r"(f32|bf16|f16|s32|u32|f64|s8|u8|pred)\[([\d,]*)\]", m.group(1)):
      n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      out[m.group(2)] += n * dtype_bytes[dt]
  return out
