"""The fine-tuning command on 2 processes x 2 CPU devices equals one process with 4 devices."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
from helpers import command_env

import jlora
from jlora.finetune import model as model_lib
from jlora.finetune.config import DEFAULT_MODEL

ARGS = ["--steps", "6", "--batch-size", "8", "--grad-accum", "2", "--max-seq-len", "32", "--rank", "4",
        "--lora-dropout", "0.1", "--eval-exact-match", "-1", "--log-every", "1", "--save-every", "3",
        "--no-progress", "--sharding", "fsdp"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  with open(os.path.join(os.path.dirname(DEFAULT_MODEL), "data", "reverse_words.eval.jsonl")) as f:
    (tmp_path / "eval.jsonl").write_text("".join(f.readlines()[:16]))
  ARGS.extend(["--eval-data", str(tmp_path / "eval.jsonl")])
  single = tmp_path / "single"
  res = subprocess.run([sys.executable, "-m", "jlora.finetune", "--output-dir", str(single), *ARGS],
                       capture_output=True, text=True, env=command_env(4), timeout=600)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

  multi = tmp_path / "multi"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "jlora.finetune", "--output-dir", str(multi), *ARGS,
       "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=command_env(2)) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert "after training" in outs[0] and "after training" not in outs[1]  # only process 0 logs

  base = model_lib.load(DEFAULT_MODEL).params
  a = jlora._checkpoint.adapter_weights(jlora.load_adapter(str(single / "adapter"), base))
  b = jlora._checkpoint.adapter_weights(jlora.load_adapter(str(multi / "adapter"), base))
  assert a.keys() == b.keys() and len(a) == 7  # 7 stacked (scanned) kernels
  # Same global batches, dropout masks and mesh (fsdp=4); only the collectives' summation
  # order differs (gloo across processes vs. in-process). Adam divides each update by the
  # gradient's RMS, so a coordinate whose gradient is ~0 can move by a visible fraction of
  # lr (4e-3) on such noise: nearly every element agrees to 1e-6, none differs by 1e-5.
  diffs = np.concatenate([np.abs(np.asarray(getattr(a[k], f)) - np.asarray(getattr(b[k], f))).ravel()
                          for k in a for f in ("a", "b")])
  assert diffs.max() < 1e-5, diffs.max()
  assert (diffs > 1e-6).mean() < 0.005, (diffs > 1e-6).mean()
  assert np.abs(np.asarray(next(iter(b.values())).b)).max() > 0
