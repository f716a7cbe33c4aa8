"""jlora.init: rule matching, errors, PEFT init distributions, keys, eval_shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora


def params():
  k = jax.random.key(0)
  return {
      "encoder": {
          "layers_0": {"attn": {"query": {"kernel": jnp.ones((16, 16)), "bias": jnp.zeros(16)},
                                "value": {"kernel": jnp.ones((16, 16)), "bias": jnp.zeros(16)}},
                       "mlp": {"kernel": jax.random.normal(k, (16, 64))}},
          "layers_1": {"attn": {"query": {"kernel": jnp.ones((16, 16)), "bias": jnp.zeros(16)},
                                "value": {"kernel": jnp.ones((16, 16)), "bias": jnp.zeros(16)}},
                       "mlp": {"kernel": jax.random.normal(k, (16, 64))}},
      },
      "step": jnp.zeros((), jnp.int32),
  }


def adapters_of(lp):
  return {p: x for p, x in jlora._tree.leaves_with_paths(lp, is_leaf=jlora._weight.is_lora_weight)
          if isinstance(x, jlora.LoraWeight)}


def test_targets_and_exclude():
  cfg = jlora.LoraConfig(targets=r".*/(query|value)/kernel", exclude=[r"encoder/layers_1/.*/value/kernel"])
  got = adapters_of(jlora.init(jax.random.key(0), params(), cfg))
  assert sorted(got) == ["encoder/layers_0/attn/query/kernel", "encoder/layers_0/attn/value/kernel",
                         "encoder/layers_1/attn/query/kernel"]


def test_first_rule_wins_with_overrides():
  cfg = jlora.LoraConfig(rank=4, alpha=8, targets=[
      jlora.Rule(pattern=r".*/mlp/kernel", rank=2, alpha=1.0), r".*kernel"])
  got = adapters_of(jlora.init(jax.random.key(0), params(), cfg))
  assert len(got) == 6
  mlp = got["encoder/layers_0/mlp/kernel"]
  assert (mlp.spec.rank, mlp.spec.scale, mlp.a.shape, mlp.b.shape) == (2, 0.5, (16, 2), (2, 64))
  q = got["encoder/layers_1/attn/query/kernel"]
  assert (q.spec.rank, q.spec.scale) == (4, 2.0)


def test_rslora_scale():
  cfg = jlora.LoraConfig(rank=16, alpha=8, rslora=True, targets=r".*/mlp/kernel")
  (w, _) = adapters_of(jlora.init(jax.random.key(0), params(), cfg)).values()
  assert w.spec.scale == pytest.approx(2.0)


def test_structure_and_input_untouched():
  p = params()
  lp = jlora.init(jax.random.key(0), p, jlora.LoraConfig(targets=r".*/mlp/kernel"))
  assert isinstance(p["encoder"]["layers_0"]["mlp"]["kernel"], jax.Array)
  w = lp["encoder"]["layers_0"]["mlp"]["kernel"]
  assert w.w0 is p["encoder"]["layers_0"]["mlp"]["kernel"]
  assert jax.tree.structure(jlora.unload(lp)) == jax.tree.structure(p)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(targets=r".*/qury/kernel"),
         r"targets\[0\] \('.\*/qury/kernel'\) matched no parameter path.*Did you mean 'encoder/layers_\d/attn/query/kernel'"),
        (dict(targets=[r".*kernel", r".*/mlp/kernel"]),
         r"targets\[1\].*only matched paths already claimed by an earlier rule.*more specific rule first"),
        (dict(targets=r".*/mlp/kernel", exclude=r".*/mlp/.*"), r"only matched paths removed by LoraConfig.exclude"),
        (dict(targets=r".*/mlp/kernel", exclude=r"nothing"), r"exclude\[0\] \('nothing'\) matched no parameter path"),
        (dict(targets=r".*/query/.*"), r"'encoder/layers_0/attn/query/bias' matched LoraConfig.targets\[0\] but is a 1-D array.*end it with '/kernel'"),
        (dict(targets=r"step"), r"'step' matched .* but is a 0-D array"),
        (dict(targets=r".*/query/kernel", rank=17), r"'encoder/layers_0/attn/query/kernel' \(shape \(16, 16\).*rank 17 exceeds min\(fan_in=16, fan_out=16\) = 16"),
    ],
)
def test_bad_targets(cfg, match):
  with pytest.raises(ValueError, match=match):
    jlora.init(jax.random.key(0), params(), jlora.LoraConfig(**cfg))


def test_integer_kernel_and_missing_layout_errors():
  with pytest.raises(ValueError, match=r"'w' matched .* has dtype int32; LoRA needs a floating-point kernel"):
    jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4), jnp.int32)}, jlora.LoraConfig(rank=2, targets="w"))
  with pytest.raises(ValueError, match=r"'w' has shape \(3, 4, 5\): jlora cannot tell its input axes.*infer_layout"):
    jlora.init(jax.random.key(0), {"w": jnp.ones((3, 4, 5))}, jlora.LoraConfig(rank=2, targets="w"))
  with pytest.raises(ValueError, match=r"'v' is targeted but the function given to jlora.infer_layout never uses it"):
    jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 4))},
               jlora.LoraConfig(rank=2, targets="w|v"), layout={"w": jlora.KernelLayout(in_axes=(0,))})
  with pytest.raises(ValueError, match=r"leaves no output axis for B"):
    jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))},
               jlora.LoraConfig(rank=2, targets=[jlora.Rule(pattern="w", layout=jlora.KernelLayout(in_axes=(0, 1)))]))
  with pytest.raises(ValueError, match=r"axis 5 is out of range"):
    jlora.init(jax.random.key(0), {"w": jnp.ones((4, 4))},
               jlora.LoraConfig(rank=2, targets=[jlora.Rule(pattern="w", layout=jlora.KernelLayout(in_axes=(5,)))]))


def test_init_twice_is_an_error():
  lp = jlora.init(jax.random.key(0), params(), jlora.LoraConfig(targets=r".*/mlp/kernel"))
  with pytest.raises(ValueError, match="already holds a LoRA adapter"):
    jlora.init(jax.random.key(0), lp, jlora.LoraConfig(targets=r".*/mlp/kernel"))


def test_peft_default_init_distribution():
  p = {"w": jnp.zeros((4096, 64))}
  w = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=16, targets="w"))["w"]
  a = np.asarray(w.a)
  bound = 1 / np.sqrt(4096)  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
  assert abs(a.std() - bound / np.sqrt(3)) < 0.02 * bound
  assert (np.asarray(w.b) == 0).all()


def test_gaussian_init():
  w = jlora.init(jax.random.key(0), {"w": jnp.zeros((2048, 64))},
                 jlora.LoraConfig(rank=8, init="gaussian", targets="w"))["w"]
  assert abs(np.asarray(w.a).std() - 1 / 8) < 0.01  # PEFT: normal_(A, std=1/r)
  assert (np.asarray(w.b) == 0).all()


def test_deterministic_and_distinct_keys_per_layer():
  cfg = jlora.LoraConfig(targets=r".*/(query|value)/kernel")
  a1 = adapters_of(jlora.init(jax.random.key(3), params(), cfg))
  a2 = adapters_of(jlora.init(jax.random.key(3), params(), cfg))
  a3 = adapters_of(jlora.init(jax.random.key(4), params(), cfg))
  for k in a1:
    np.testing.assert_array_equal(np.asarray(a1[k].a), np.asarray(a2[k].a))
    assert not np.array_equal(np.asarray(a1[k].a), np.asarray(a3[k].a))
  mats = [np.asarray(w.a) for w in a1.values()]
  for i in range(len(mats)):
    for j in range(i + 1, len(mats)):
      assert not np.array_equal(mats[i], mats[j])


def test_adapter_dtype():
  p = {"w": jnp.ones((8, 8), jnp.bfloat16)}
  w = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets="w"))["w"]
  assert w.a.dtype == jnp.float32 and w.b.dtype == jnp.float32 and w.w0.dtype == jnp.bfloat16
  w = jlora.init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets="w", adapter_dtype=jnp.bfloat16))["w"]
  assert w.a.dtype == jnp.bfloat16


def test_eval_shape_sizes_a_huge_model_without_memory():
  # A 175B-class GPT-3 shape: 96 layers, d=12288; only shapes, nothing allocated.
  d, layers = 12288, 96
  shapes = {f"layer_{i}": {"qkv": {"kernel": jax.ShapeDtypeStruct((d, 3 * d), jnp.bfloat16)},
                           "out": {"kernel": jax.ShapeDtypeStruct((d, d), jnp.bfloat16)},
                           "up": {"kernel": jax.ShapeDtypeStruct((d, 4 * d), jnp.bfloat16)},
                           "down": {"kernel": jax.ShapeDtypeStruct((4 * d, d), jnp.bfloat16)}}
            for i in range(layers)}
  cfg = jlora.LoraConfig(rank=16, targets=r".*/kernel")
  out = jax.eval_shape(lambda p: jlora.init(jax.random.key(0), p, cfg), shapes)
  c = jlora.count(out)
  assert c.num_adapters == 4 * layers
  assert c.frozen == layers * 12 * d * d  # 174B base parameters
  assert c.trainable == layers * 16 * (d + 3 * d + d + d + d + 4 * d + 4 * d + d)
  assert c.adapter_bytes == 4 * c.trainable and c.frozen_bytes == 2 * c.frozen
  w = out["layer_0"]["qkv"]["kernel"]
  assert isinstance(w.a, jax.ShapeDtypeStruct) and w.a.shape == (d, 16) and w.b.shape == (16, 3 * d)
