#!/usr/bin/env python3
"""Fine-tune with jlora on a Cloud TPU VM or pod slice: create, set up, run, watch, fetch, delete.

Every step is a plain ``gcloud`` command; ``--dry-run`` prints them instead of running them.

  python tpu_scripts/tpu.py --dry-run all --name jlora-v4 --zone us-central2-b \\
      --accelerator-type v4-32 --bucket gs://my-bucket --data data/train.jsonl \\
      -- --model /home/$USER/models/llama --rank 16 --lr 2e-4 --bf16

Steps (each is also a subcommand): ``create`` the TPU VM; ``setup`` copies this checkout to
every worker and installs jlora with ``jax[tpu]``; ``data`` mounts the bucket with gcsfuse on
every worker (one shared directory: Orbax checkpoints are written collectively) and copies the
data file into it; ``run`` starts ``python -m jlora.finetune --coordinator auto`` on all
workers at once (``--worker=all``), logging to ``~/jlora-train.log``; ``logs`` tails worker
0's log; ``fetch`` copies the adapter (and PEFT export) back; ``delete`` removes the VM.
Arguments after ``--`` go to ``jlora.finetune``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = "~/jlora-venv"
MOUNT = "~/gcs"
LOG = "~/jlora-train.log"


def _gcloud(args, *, project: str | None) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", *args]
  if project:
    cmd.append(f"--project={project}")
  return cmd


def _ssh(a, command: str, worker: str = "all") -> list[str]:
  return _gcloud(["ssh", a.name, f"--zone={a.zone}", f"--worker={worker}", f"--command={command}"],
                 project=a.project)


def run_dir(a) -> str:
  return f"{MOUNT}/runs/{a.name}"


def commands(step: str, a, finetune_args: Sequence[str]) -> list[list[str]]:
  """The gcloud commands of one step."""
  bucket = a.bucket.removeprefix("gs://") if a.bucket else ""
  if step == "create":
    cmd = _gcloud(["create", a.name, f"--zone={a.zone}", f"--accelerator-type={a.accelerator_type}",
                   f"--version={a.runtime_version}"], project=a.project)
    if a.spot:
      cmd.append("--spot")
    return [cmd]
  if step == "setup":
    install = (f"python3 -m venv {VENV} && . {VENV}/bin/activate && pip install -U pip && "
               f"pip install 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html && "
               f"pip install -e ~/jlora'[hf]'")
    return [
        _gcloud(["scp", "--recurse", REPO, f"{a.name}:~/jlora", f"--zone={a.zone}", "--worker=all"],
                project=a.project),
        _ssh(a, install),
    ]
  if step == "data":
    if not bucket:
      raise SystemExit("--bucket gs://... is needed: workers share checkpoints through it")
    mount = (f"mkdir -p {MOUNT} && (mountpoint -q {MOUNT} || gcsfuse --implicit-dirs {shlex.quote(bucket)} {MOUNT})"
             f" && mkdir -p {run_dir(a)}")
    cmds = [_ssh(a, mount)]
    if a.data:
      cmds.append(["gsutil", "cp", a.data, f"gs://{bucket}/runs/{a.name}/{os.path.basename(a.data)}"])
    return cmds
  if step == "run":
    data = f" --data {run_dir(a)}/{os.path.basename(a.data)}" if a.data else ""
    extra = " ".join(shlex.quote(x) for x in finetune_args)
    launch = (f"cd ~/jlora && . {VENV}/bin/activate && nohup python -m jlora.finetune --coordinator auto "
              f"--output-dir {run_dir(a)}{data} {extra} > {LOG} 2>&1 &").replace("  ", " ")
    return [_ssh(a, launch)]
  if step == "logs":
    return [_ssh(a, f"tail -n 50 -f {LOG}", worker="0")]
  if step == "fetch":
    return [["gsutil", "-m", "cp", "-r", f"gs://{bucket}/runs/{a.name}/adapter",
             f"gs://{bucket}/runs/{a.name}/peft", f"gs://{bucket}/runs/{a.name}/summary.json", a.fetch_to]]
  if step == "delete":
    return [_gcloud(["delete", a.name, f"--zone={a.zone}", "--quiet"], project=a.project)]
  raise ValueError(step)


STEPS = ("create", "setup", "data", "run", "logs", "fetch", "delete")


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  finetune_args: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, finetune_args = argv[:i], argv[i + 1:]
  ap = argparse.ArgumentParser(prog="tpu_scripts/tpu.py", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
  ap.add_argument("step", choices=(*STEPS, "all"),
                  help="one step, or 'all' = create, setup, data, run (then use logs/fetch/delete)")
  ap.add_argument("--name", required=True, help="TPU VM name")
  ap.add_argument("--zone", required=True, help="e.g. us-central2-b")
  ap.add_argument("--accelerator-type", default="v4-8", help="e.g. v4-8, v4-32, v5litepod-16")
  ap.add_argument("--runtime-version", default="tpu-ubuntu2204-base", help="TPU VM software version")
  ap.add_argument("--project", default=None)
  ap.add_argument("--spot", action="store_true", help="a Spot (preemptible) VM: jlora resumes after preemption")
  ap.add_argument("--bucket", default="", help="gs://bucket shared by the workers (data, checkpoints, outputs)")
  ap.add_argument("--data", default="", help="local or gs:// training file copied into the bucket")
  ap.add_argument("--fetch-to", default=".", help="local directory for 'fetch'")
  a = ap.parse_args(argv)
  steps = ("create", "setup", "data", "run") if a.step == "all" else (a.step,)
  for step in steps:
    for cmd in commands(step, a, finetune_args):
      print(shlex.join(cmd), flush=True)
      if not a.dry_run:
        subprocess.run(cmd, check=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
