"""Sharding on 8 fake CPU devices, each check in its own process (XLA_FLAGS set there only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run_check(name: str, tmp_path) -> None:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  res = subprocess.run([sys.executable, os.path.join(HERE, "checks.py"), name, str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
  assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout[-4000:] + res.stderr[-4000:]


@pytest.mark.parametrize("name", [
    "sharded_init",
    "sharded_step_matches_single_device",
    "sharded_merge",
    "checkpoint_onto_other_mesh",
    "native_load_onto_mesh",
    "qlora_sharded_step_matches_single_device",
    pytest.param("finetune_qlora_on_mesh", marks=pytest.mark.slow),  # the QLoRA step on a mesh is checked above
])
def test_sharding(name, tmp_path):
  run_check(name, tmp_path)
