"""AdaLoRA's rank allocator as an optax transformation: the schedule lives in the optimizer state.

PEFT runs the allocator as ``model.base_model.update_and_allocate(step)`` after each
``optimizer.step()``; forgetting that call silently trains a plain LoRA (PEFT
#1801). Here it wraps the optimizer: ``adalora(inner, ...)`` computes ``inner``'s
update, then — with the step count, the importance EMAs and the rank pattern in
its state — updates the importance of every ``P``/``Λ``/``Q`` entry and zeroes the
``Λ`` entries below the budget's threshold by returning the update that sets them
to 0. The whole step stays one pure, jittable function.

Semantics are PEFT's ``RankAllocator`` / ``AdaLoraModel.update_and_allocate``, with
the k-th update (k = 1, 2, ...) playing ``update_and_allocate(global_step=k)``:

* importance ``I = |p ⊙ g|`` of the parameters after the inner update (PEFT calls
  the allocator after ``optimizer.step()``); ``Ī ← β1·Ī + (1−β1)·I``,
  ``Ū ← β2·Ū + (1−β2)·|I − Ī|``; score ``Ī·Ū``; triplet score of rank i:
  ``s(Λ_i) + mean_j s(P_ij) + mean_j s(Q_ji)`` — while ``k < T − tfinal``;
* budget: ``init_bgt = Σ r`` before ``tinit``, then the cubic schedule down to
  ``target_bgt = target_rank × #matrices`` (``int`` of the float64 value, as
  PEFT), masking every ``delta_t`` steps: ``Λ`` is zeroed where the triplet score
  is ``≤`` the ``(init_bgt − budget)``-th smallest score;
* at ``k == T − tfinal`` the final pattern is fixed (and the EMAs reset); after
  it, that pattern is re-applied every step.

Unlike PEFT, a step whose budget equals the initial one masks nothing instead of
failing in ``kthvalue(k=0)`` (PEFT #2337).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora._tree import path_str
from jlora._weight import LoraWeight, is_lora_weight
from jlora.variants._adalora import AdaLoRA, adalora_weights

Params = Any
_TRIPLET = ("a", "e", "b")


class AdaLoraState(NamedTuple):
  """The allocator's state: step count, the inner optimizer's state, EMAs and the rank pattern."""

  count: jax.Array  # updates done so far (int32)
  inner: Any
  ipt: dict  # {path: {"a"|"e"|"b": EMA of the sensitivity |p·g|}}
  unc: dict  # {path: {"a"|"e"|"b": EMA of the uncertainty |I − Ī|}}
  keep: dict  # {path: bool (*batch, r)}: ranks kept by the last masking (all True before any)


def budget_table(init_bgt: int, target_bgt: int, total_steps: int, tinit: int, tfinal: int) -> np.ndarray:
  """``budget[k]`` for k = 0..total_steps+1 with PEFT's float64 arithmetic (``RankAllocator.budget_schedule``)."""
  out = np.empty(total_steps + 2, np.int64)
  for step in range(total_steps + 2):
    if step <= tinit:
      out[step] = init_bgt
    elif step > total_steps - tfinal:
      out[step] = target_bgt
    else:
      mul_coeff = 1 - (step - tinit) / (total_steps - tfinal - tinit)
      out[step] = int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt)
  return out


def _check(name: str, value: Any, ok: bool, want: str) -> None:
  if not ok:
    raise ValueError(f"jlora.variants.adalora: {name} must be {want}, got {value!r}.")


def adalora(inner: optax.GradientTransformation, *, target_rank: int, total_steps: int, tinit: int = 0,
            tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85
            ) -> optax.GradientTransformation:
  """Wraps ``inner`` with AdaLoRA's rank allocation (PEFT's ``RankAllocator``).

  Use it as the inner optimizer of ``jlora.optimizer`` (or on its own) and add
  ``orth_reg_weight * jlora.variants.orthogonality_penalty(adapters)`` to the
  loss. After training, ``jlora.variants.adalora_finalize(params, opt_state)``
  writes the final rank pattern into the adapters.

  Args:
    inner: the optimizer whose updates are applied (e.g. ``optax.adamw(1e-3)``).
    target_rank: average rank per matrix at the end (PEFT ``target_r``).
    total_steps: planned number of updates (PEFT ``total_step``).
    tinit: warm-up updates before any pruning (PEFT ``tinit``).
    tfinal: final updates with the rank pattern fixed (PEFT ``tfinal``).
    delta_t: prune every ``delta_t`` updates during the schedule (PEFT ``deltaT``).
    beta1: EMA factor of the sensitivity.
    beta2: EMA factor of the uncertainty.

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

  Raises:
    ValueError: bad schedule values, or (at ``init``) a tree without AdaLoRA adapters.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> cfg = jlora.LoraConfig(rank=4, alpha=8, targets="w", variant=jlora.AdaLoRA())
    >>> adapters, frozen = jlora.split(jlora.init(jax.random.key(0), {"w": jnp.ones((8, 8))}, cfg))
    >>> tx = jlora.optimizer(jlora.variants.adalora(optax.sgd(0.1), target_rank=2, total_steps=10), adapters)
    >>> state = tx.init(adapters)
    >>> grads = jax.tree.map(jnp.ones_like, adapters)
    >>> updates, state = jax.jit(tx.update)(grads, state, adapters)
  """
  for name, v in (("target_rank", target_rank), ("tinit", tinit), ("tfinal", tfinal)):
    _check(name, v, isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0, "an integer >= 0")
  _check("total_steps", total_steps, isinstance(total_steps, (int, np.integer)) and total_steps > 0,
         "an integer > 0 (AdaLoRA's schedule needs the planned number of steps)")
  _check("delta_t", delta_t, isinstance(delta_t, (int, np.integer)) and delta_t > 0, "an integer > 0")
  for name, v in (("beta1", beta1), ("beta2", beta2)):
    _check(name, v, isinstance(v, (int, float)) and 0 < v < 1, "in (0, 1)")
  if tinit >= total_steps - tfinal:
    raise ValueError(f"jlora.variants.adalora: tinit={tinit} >= total_steps - tfinal = {total_steps - tfinal} "
                     "leaves no budgeting phase; decrease tinit/tfinal or increase total_steps.")
  final_step = total_steps - tfinal

  def init_fn(params):
    ws = adalora_weights(params)
    if not ws:
      raise ValueError("jlora.variants.adalora: the parameters hold no AdaLoRA adapters; create them with "
                       "jlora.LoraConfig(variant=jlora.AdaLoRA(), ...).")
    for p, w in ws.items():
      if any(w.factors[n] is None for n in _TRIPLET):
        raise ValueError(f"jlora.variants.adalora: {p!r} lacks P, Λ or Q; pass the trained adapters.")
    zeros = {p: {n: jnp.zeros(jnp.shape(w.factors[n]), jnp.float32) for n in _TRIPLET} for p, w in ws.items()}
    keep = {p: jnp.ones(jnp.shape(w.factors["e"]), bool) for p, w in ws.items()}
    return AdaLoraState(jnp.zeros((), jnp.int32), inner.init(params), zeros, jax.tree.map(jnp.copy, zeros), keep)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("jlora.variants.adalora: update() needs params (the importance is |p·g|).")
    grads = updates
    inner_updates, inner_state = inner.update(updates, state.inner, params)
    ws_p, ws_g, ws_u = adalora_weights(params), adalora_weights(grads), adalora_weights(inner_updates)
    init_bgt = sum(int(np.prod(jnp.shape(w.factors["e"]))) for w in ws_p.values())
    n_matrices = sum(int(np.prod(jnp.shape(w.factors["e"])[:-1])) for w in ws_p.values())
    table = jnp.asarray(budget_table(init_bgt, target_rank * n_matrices, total_steps, tinit, tfinal), jnp.int32)

    step = state.count + 1
    update_ipt = step < final_step
    new_p = {p: {n: (w.factors[n] + ws_u[p].factors[n]).astype(jnp.float32) for n in _TRIPLET}
             for p, w in ws_p.items()}
    ipt, unc = {}, {}
    for p in ws_p:
      ipt[p], unc[p] = {}, {}
      for n in _TRIPLET:
        i = jnp.abs(new_p[p][n] * ws_g[p].factors[n].astype(jnp.float32))
        e_ipt = beta1 * state.ipt[p][n] + (1 - beta1) * i
        e_unc = beta2 * state.unc[p][n] + (1 - beta2) * jnp.abs(i - e_ipt)
        ipt[p][n] = jnp.where(update_ipt, e_ipt, state.ipt[p][n])
        unc[p][n] = jnp.where(update_ipt, e_unc, state.unc[p][n])

    budget = table[jnp.minimum(step, total_steps + 1)]
    scheduled = (step > tinit) & (step < final_step) & (step % delta_t == 0)
    masking = scheduled | (step == final_step)
    scores = {p: _triplet_score(ws_p[p], ipt[p], unc[p]) for p in ws_p}
    flat = jnp.concatenate([s.reshape(-1) for s in scores.values()])
    k = init_bgt - budget
    threshold = jnp.where(k >= 1, jnp.sort(flat)[jnp.clip(k - 1, 0, flat.size - 1)], -jnp.inf)
    keep = {p: jnp.where(masking, scores[p] > threshold, state.keep[p]) for p in ws_p}
    apply_mask = masking | (step > final_step)
    reset = step == final_step
    ipt = jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), ipt)
    unc = jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), unc)

    def mask_e(path, u):
      if not is_lora_weight(u):
        return u
      p = path_str(path)
      if p not in ws_p:
        return u
      e, ue = ws_p[p].factors["e"], u.factors["e"]
      return u.replace(e=jnp.where(apply_mask & ~keep[p], -e, ue).astype(ue.dtype))

    out = jax.tree_util.tree_map_with_path(mask_e, inner_updates, is_leaf=is_lora_weight)
    return out, AdaLoraState(step, inner_state, ipt, unc, keep)

  return optax.GradientTransformation(init_fn, update_fn)


def _triplet_score(w: LoraWeight, ipt: dict, unc: dict) -> jax.Array:
  """``s(Λ_i) + mean_j s(P_ij) + mean_j s(Q_ji)`` per stacked index and rank: ``(*batch, r)``."""
  spec = w.spec
  nb = len(spec.batch_axes)
  s = {n: ipt[n] * unc[n] for n in _TRIPLET}
  s_a = jnp.mean(s["a"], axis=tuple(range(nb, nb + len(spec.in_axes))))
  s_b = jnp.mean(s["b"], axis=tuple(range(nb + 1, nb + 1 + len(spec.out_axes))))
  return s["e"] + s_a + s_b


def find_state(opt_state: Any) -> AdaLoraState:
  found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, AdaLoraState))
           if isinstance(x, AdaLoraState)]
  if len(found) != 1:
    raise ValueError(f"expected one jlora.variants.adalora state in the optimizer state, found {len(found)}.")
  return found[0]


def adalora_finalize(params: Params, opt_state: Any) -> Params:
  """Writes the allocator's rank pattern into the AdaLoRA adapters (``rank_mask``; ``Λ`` zeroed there).

  Call it on the full tree (``jlora.combine(adapters, frozen)``) after training;
  the pattern is then saved with the adapters, exported as PEFT's
  ``rank_pattern`` and used by ``jlora.variants.to_lora``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> cfg = jlora.LoraConfig(rank=4, targets="w", variant=jlora.AdaLoRA())
    >>> lp = jlora.init(jax.random.key(0), {"w": jnp.ones((8, 8))}, cfg)
    >>> tx = jlora.variants.adalora(optax.sgd(0.1), target_rank=2, total_steps=4)
    >>> jlora.variants.rank_pattern(jlora.variants.adalora_finalize(lp, tx.init(lp)))["w"].sum()
    np.int64(4)
  """
  state = find_state(opt_state)

  def fin(path, w):
    if not (is_lora_weight(w) and isinstance(w.spec.variant, AdaLoRA)):
      return w
    p = path_str(path)
    if p not in state.keep:
      raise ValueError(f"adalora_finalize: {p!r} is not in the optimizer state; same tree as the optimizer's?")
    if not w.is_complete:
      raise ValueError(f"adalora_finalize: {p!r} is incomplete; pass jlora.combine(adapters, frozen).")
    keep = state.keep[p]
    mask = keep.astype(w.factors["rank_mask"].dtype)
    return w.replace(rank_mask=mask, e=jnp.where(keep, w.factors["e"], 0).astype(w.factors["e"].dtype))

  return jax.tree_util.tree_map_with_path(fin, params, is_leaf=is_lora_weight)
