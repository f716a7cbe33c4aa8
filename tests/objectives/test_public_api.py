import jax.numpy as jnp

from jlora import objectives


def test_every_exported_name_resolves():
  for name in objectives.__all__:
    assert getattr(objectives, name) is not None, name
  assert sorted(objectives.__all__) == sorted(set(objectives.__all__))
  assert objectives.DPO_LOSS_TYPES == ("sigmoid", "ipo", "hinge", "robust")


def test_one_sequence_without_a_batch_axis():
  head = objectives.Head(jnp.eye(4, 6))
  labels = jnp.array([1, -100, 3])
  got = objectives.token_logprobs(jnp.ones((3, 4)), head, labels, chunk_size=2)
  assert got.shape == (3,)
  assert jnp.allclose(got, objectives.token_logprobs_full(jnp.ones((3, 4)), head, labels))
