"""Sharding on 8 fake CPU devices, in a subprocess (XLA_FLAGS set there only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import command_env

HERE = os.path.dirname(os.path.abspath(__file__))


def run_checks(names: list[str], tmp_path) -> None:
  """Runs the named checks of checks.py in one subprocess; fails naming each failed check."""
  env = command_env(8)
  res = subprocess.run([sys.executable, os.path.join(HERE, "checks.py"), str(tmp_path), *names],
                       capture_output=True, text=True, env=env, timeout=900)
  ok = [n for n in names if any(l.startswith(f"{n} OK") for l in res.stdout.splitlines())]
  assert res.returncode == 0 and ok == names, (
      f"failed: {[n for n in names if n not in ok]}\n" + res.stdout[-6000:] + res.stderr[-4000:])


def test_sharding(tmp_path):
  """On 8 devices: sharded init, a sharded step equal to one device's, sharded merge, checkpoints
  restored onto another mesh, native and 4-bit loading onto a mesh, the QLoRA step sharded, the
  fine-tuning step compiled once, routed-expert adapters on an `expert` axis equal to one device."""
  run_checks(["sharded_init", "sharded_step_matches_single_device", "sharded_merge", "checkpoint_onto_other_mesh",
              "native_load_onto_mesh", "qlora_sharded_step_matches_single_device", "finetune_step_compiles_once",
              "expert_parallel_step_matches_single_device"], tmp_path)


@pytest.mark.slow  # the QLoRA step on a mesh is checked above
def test_finetune_qlora_on_mesh(tmp_path):
  run_checks(["finetune_qlora_on_mesh"], tmp_path)


def test_mesh_axes_are_named():
  import jlora.sharding as jsh

  with pytest.raises(ValueError, match=r"mesh 'experts=2': write it as data=N,fsdp=N,expert=N,tensor=N"):
    jsh.make_mesh("experts=2")
  with pytest.raises(ValueError, match=r"unknown axes \['pipeline'\]; the axes are data, fsdp, expert, tensor"):
    jsh.make_mesh({"pipeline": 1})
