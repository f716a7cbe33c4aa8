"""save_adapter / load_adapter: exact round trip, self-describing metadata, clear refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import randomize


def base():
  k = jax.random.key(0)
  return {"enc": {"q": {"kernel": jax.random.normal(k, (8, 8))}, "v": {"kernel": jax.random.normal(k, (8, 4))}},
          "emb": {"embedding": jax.random.normal(k, (10, 8))}}


def lora(p):
  cfg = jlora.LoraConfig(rank=2, alpha=4, rslora=True, targets=[
      jlora.Rule(pattern=r"enc/v/kernel", rank=3, alpha=1.0), r".*kernel", r".*/embedding"])
  return randomize(jlora.init(jax.random.key(1), p, cfg), jax.random.key(2))


def test_round_trip_is_exact(tmp_path):
  p = base()
  lp = lora(p)
  jlora.save_adapter(str(tmp_path / "a"), lp, base_model="demo/base", extra={"note": "x"})
  back = jlora.load_adapter(str(tmp_path / "a"), p)
  assert jax.tree.structure(back) == jax.tree.structure(lp)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for path in ("enc/q/kernel", "enc/v/kernel", "emb/embedding"):
    w0 = jlora._checkpoint.adapter_weights(lp)[path]
    w1 = jlora._checkpoint.adapter_weights(back)[path]
    assert w0.spec == w1.spec
  meta = jlora.read_adapter_metadata(str(tmp_path / "a"))
  assert meta["base_model"] == "demo/base" and meta["note"] == "x"
  assert meta["base_fingerprint"] == jlora.fingerprint(p)
  assert meta["adapters"]["enc/v/kernel"]["rank"] == 3
  assert meta["adapters"]["enc/q/kernel"]["scale"] == pytest.approx(4 / np.sqrt(2))
  assert meta["adapters"]["emb/embedding"]["layout"]["embedding"] is True


def test_only_adapters_are_written(tmp_path):
  p = {"w": jnp.ones((512, 512))}
  lp = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets="w"))
  d = jlora.save_adapter(str(tmp_path / "a"), lp)
  import os
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
  assert size < 512 * 512 * 4 / 10  # far below the 1 MiB base kernel


def test_refusals(tmp_path):
  p = base()
  d = jlora.save_adapter(str(tmp_path / "a"), lora(p))
  other = jax.tree.map(lambda x: x + 1, p)
  with pytest.raises(jlora.AdapterMismatchError, match=r"weights fingerprint .* check_base=False"):
    jlora.load_adapter(d, other)
  assert jlora.load_adapter(d, other, check_base=False)["enc"]["q"]["kernel"].spec.rank == 2
  missing = {"enc": p["enc"]}
  with pytest.raises(jlora.AdapterMismatchError, match=r"no 'emb/embedding'"):
    jlora.load_adapter(d, missing, check_base=False)
  reshaped = {**p, "enc": {**p["enc"], "v": {"kernel": jnp.ones((8, 5))}}}
  with pytest.raises(jlora.AdapterMismatchError, match=r"'enc/v/kernel' was made for a kernel of shape \(8, 4\)"):
    jlora.load_adapter(d, reshaped, check_base=False)
  with pytest.raises(FileNotFoundError):
    jlora.load_adapter(str(tmp_path / "nope"), p)
  with pytest.raises(jlora.AdapterMismatchError, match="already holds an adapter"):
    jlora.load_adapter(d, lora(p), check_base=False)


def test_fingerprint_ignores_adapters_and_sees_weights():
  p = base()
  assert jlora.fingerprint(lora(p)) == jlora.fingerprint(p)
  # Other weights give another fingerprint. (Kernels are identified by the NF4 codes of sampled
  # blocks, which a 4-bit copy stores too; a uniform rescale of a whole kernel is not seen.)
  other = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(jax.random.key(9), x.shape), p)
  assert jlora.fingerprint(other) != jlora.fingerprint(p)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p)
  assert jlora.fingerprint(shapes) == jlora.fingerprint(shapes)
