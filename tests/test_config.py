"""LoraConfig / Rule / KernelLayout validation: every bad input is a ValueError with a fix."""

import math

import pytest

import jlora


def test_defaults_and_scale():
  cfg = jlora.LoraConfig(targets="kernel")
  assert (cfg.rank, cfg.alpha, cfg.rslora, cfg.init, cfg.adapter_dtype) == (8, 8.0, False, "default", "float32")
  assert cfg.scale_for(rank=8, alpha=16) == 2.0
  rs = jlora.LoraConfig(targets="kernel", rslora=True)
  assert math.isclose(rs.scale_for(rank=16, alpha=8), 2.0)


def test_frozen_and_kw_only():
  cfg = jlora.LoraConfig(targets="kernel")
  with pytest.raises(Exception):
    cfg.rank = 4
  with pytest.raises(TypeError):
    jlora.LoraConfig(8)  # positional


def test_targets_normalized_to_rules():
  cfg = jlora.LoraConfig(targets=["a", jlora.Rule(pattern="b", rank=2)])
  assert cfg.targets == (jlora.Rule(pattern="a"), jlora.Rule(pattern="b", rank=2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0, targets="k"), r"LoraConfig.rank must be a positive integer"),
        (dict(rank=2.5, targets="k"), r"LoraConfig.rank must be a positive integer"),
        (dict(alpha=0, targets="k"), r"LoraConfig.alpha must be a finite number > 0"),
        (dict(alpha=-1.0, targets="k"), r"LoraConfig.alpha must be a finite number > 0"),
        (dict(dropout=1.0, targets="k"), r"dropout must be a float in \[0, 1\)"),
        (dict(targets=()), r"targets is empty"),
        (dict(targets="("), r"not a valid regex"),
        (dict(targets=[3]), r"targets\[0\] must be a regex string or a jlora.Rule"),
        (dict(targets="k", exclude="("), r"exclude '\(' is not a valid regex"),
        (dict(targets="k", init="pizza"), r"init must be one of.*pissa"),
        (dict(targets="k", adapter_dtype="int8"), r"adapter_dtype must be a floating dtype"),
        (dict(targets="k", adapter_dtype="nope"), r"is not a dtype"),
        (dict(targets="k", rnak=4), r"unknown option\(s\) 'rnak' \(did you mean 'rank'\?\)"),
        (dict(targets="k", rslora="yes"), r"rslora must be a bool"),
    ],
)
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    jlora.LoraConfig(**kwargs)


def test_bad_rule_and_layout():
  with pytest.raises(ValueError, match=r"Rule\('k'\).rank must be a positive integer"):
    jlora.Rule(pattern="k", rank=-2)
  with pytest.raises(ValueError, match=r"Rule\('k'\).alpha must be a finite number"):
    jlora.Rule(pattern="k", alpha=float("nan"))
  with pytest.raises(ValueError, match="unknown option"):
    jlora.Rule(pattern="k", ranks=2)
  with pytest.raises(ValueError, match="in_axes must name at least one"):
    jlora.KernelLayout(in_axes=())
  with pytest.raises(ValueError, match="both input and batch axes"):
    jlora.KernelLayout(in_axes=(0,), batch_axes=(0,))
  with pytest.raises(ValueError, match="layout must be a jlora.KernelLayout"):
    jlora.Rule(pattern="k", layout=(0,))
  with pytest.raises(ValueError, match=r"Rule\('k'\).rslora must be True, False or None"):
    jlora.Rule(pattern="k", rslora="yes")


def test_rslora_per_rule_overrides_the_config():
  import jax
  import jax.numpy as jnp

  params = {"a": {"kernel": jnp.ones((16, 16))}, "b": {"kernel": jnp.ones((16, 16))}}
  cfg = jlora.LoraConfig(rank=4, alpha=8, targets=[jlora.Rule(pattern="a/kernel", rslora=True), "b/kernel"])
  lp = jlora.init(jax.random.key(0), params, cfg)
  assert (lp["a"]["kernel"].spec.scale, lp["b"]["kernel"].spec.scale) == (8 / 2.0, 8 / 4)
  cfg = jlora.LoraConfig(rank=4, alpha=8, rslora=True, targets=[jlora.Rule(pattern="a/kernel", rslora=False), "b.*"])
  lp = jlora.init(jax.random.key(0), params, cfg)
  assert (lp["a"]["kernel"].spec.scale, lp["b"]["kernel"].spec.scale) == (8 / 4, 8 / 2.0)


def test_dict_round_trip():
  cfg = jlora.LoraConfig(
      rank=4, alpha=8, rslora=True, dropout=0.1, exclude=["x"],
      targets=["a", jlora.Rule(pattern="b", rank=2, alpha=3.0, layout=jlora.KernelLayout(in_axes=(1,)),
                               rslora=False)])
  assert jlora.LoraConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown option"):
    jlora.LoraConfig.from_dict({**cfg.to_dict(), "bogus": 1})
