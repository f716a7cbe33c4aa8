"""tpu_scripts/tpu.py --dry-run prints the exact gcloud commands of each step."""

import os
import shlex
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "tpu_scripts", "tpu.py")


def dry(*args):
  res = subprocess.run([sys.executable, SCRIPT, "--dry-run", *args], capture_output=True, text=True, check=True)
  return [shlex.split(line) for line in res.stdout.strip().splitlines()]


def test_all_steps_in_order():
  cmds = dry("all", "--name", "jl", "--zone", "us-central2-b", "--accelerator-type", "v4-32",
             "--bucket", "gs://bk", "--data", "train.jsonl", "--project", "proj", "--spot",
             "--", "--model", "/m", "--rank", "16")
  create, scp, install, mount, copy, launch = cmds
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "jl"]
  assert {"--zone=us-central2-b", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
          "--project=proj"} <= set(create)
  assert scp[4] == "scp" and "--worker=all" in scp and "jl:~/jlora" in scp
  assert install[4] == "ssh" and "--worker=all" in install
  assert any("pip install 'jax[tpu]'" in c and "pip install -e ~/jlora'[hf]'" in c for c in install)
  assert any("gcsfuse --implicit-dirs bk ~/gcs" in c for c in mount)
  assert copy == ["gsutil", "cp", "train.jsonl", "gs://bk/runs/jl/train.jsonl"]
  assert launch[4] == "ssh" and "--worker=all" in launch
  remote = next(c for c in launch if c.startswith("--command="))
  assert ("python -m jlora.finetune --coordinator auto --output-dir ~/gcs/runs/jl "
          "--data ~/gcs/runs/jl/train.jsonl --model /m --rank 16") in remote


def test_single_steps():
  (logs,) = dry("logs", "--name", "jl", "--zone", "z")
  assert "--worker=0" in logs and any("tail -n 50 -f ~/jlora-train.log" in c for c in logs)
  (fetch,) = dry("fetch", "--name", "jl", "--zone", "z", "--bucket", "gs://bk", "--fetch-to", "out")
  assert fetch[:4] == ["gsutil", "-m", "cp", "-r"] and fetch[-1] == "out" and "gs://bk/runs/jl/adapter" in fetch
  (delete,) = dry("delete", "--name", "jl", "--zone", "z")
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "jl", "--zone=z", "--quiet"]


def test_data_step_needs_a_bucket():
  res = subprocess.run([sys.executable, SCRIPT, "--dry-run", "data", "--name", "jl", "--zone", "z"],
                       capture_output=True, text=True)
  assert res.returncode != 0 and "--bucket gs://... is needed" in res.stderr
