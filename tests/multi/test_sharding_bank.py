"""A bank on 8 fake CPU devices: sharded serving and multi-tenant gradients equal the single-device ones."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import command_env

HERE = os.path.dirname(os.path.abspath(__file__))


def test_bank_under_fsdp_and_tensor_parallelism():
  env = command_env(8)
  res = subprocess.run([sys.executable, os.path.join(HERE, "sharding_check.py")], capture_output=True, text=True,
                       env=env, timeout=600)
  assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout[-4000:] + res.stderr[-4000:]
