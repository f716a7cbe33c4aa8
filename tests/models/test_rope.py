"""RoPE inverse frequencies against transformers' own rope init functions."""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from jlora.models import ModelConfig  # noqa: E402
from jlora.models.rope import inverse_frequencies  # noqa: E402

HEAD_DIM = 64
CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    "yarn_mscale": {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                    "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 4096},
    "yarn_attention_factor": {"type": "yarn", "factor": 2.0, "attention_factor": 1.3, "truncate": False},
}


@pytest.mark.parametrize("case", list(CASES))
def test_inverse_frequencies_match_transformers(case):
  hf = transformers.LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, rope_theta=500000.0,
                                max_position_embeddings=16384, rope_scaling=CASES[case])
  rope_type = (CASES[case] or {}).get("rope_type", (CASES[case] or {}).get("type", "default"))
  want_inv, want_scale = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
  cfg = ModelConfig.from_hf(hf.to_dict())
  got_inv, got_scale = inverse_frequencies(cfg.rope, cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings)
  # transformers computes in float32, jlora in float64 rounded once: ~1 float32 ulp apart.
  np.testing.assert_allclose(got_inv, want_inv.numpy(), rtol=2e-6)
  assert got_scale == pytest.approx(want_scale, rel=1e-12)
  if rope_type != "default":
    base = inverse_frequencies(ModelConfig.from_hf({**hf.to_dict(), "rope_scaling": None}).rope, HEAD_DIM,
                               max_position_embeddings=16384)[0]
    assert not np.allclose(got_inv, base)  # the scaling is really applied


def test_llama3_scaling_changes_most_frequency_pairs_at_head_dim_128():
  # model_families.md: without llama3 scaling 35 of the 64 pairs of a Llama 3.1 head differ.
  cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4096, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 32, "rope_theta": 500000.0}
  scaled = ModelConfig.from_hf({**cfg, "rope_scaling": CASES["llama3"]})
  plain = ModelConfig.from_hf(cfg)
  a = inverse_frequencies(scaled.rope, 128, max_position_embeddings=131072)[0]
  b = inverse_frequencies(plain.rope, 128, max_position_embeddings=131072)[0]
  assert int(np.sum(~np.isclose(a, b, rtol=1e-6))) == 35
