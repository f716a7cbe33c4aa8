"""``python -m jlora.memory``: training memory of full fine-tuning, LoRA, DoRA and QLoRA.

  python -m jlora.memory --model gpt3-175b --targets query,value --rank 4 --batch 1 --seq 2048
  python -m jlora.memory --model /path/to/hf-model --plot memory.png

Nothing is trained or even allocated: each train step is compiled from shapes
(``jax.ShapeDtypeStruct``) and XLA's memory analysis is split into categories.
"""

from __future__ import annotations

import argparse
import json
import sys

from jlora.memory import _cli


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jlora.memory", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="gpt3-175b",
                 help="a preset (" + ", ".join(sorted(_cli.PRESETS)) + ") or a Hugging Face model directory "
                      "(only config.json is read)")
  p.add_argument("--targets", default="",
                 help="all-linear, comma-separated module names or a regex on parameter paths (default: "
                      "query,value for the GPT presets, all-linear for HF models)")
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--alpha", type=float, default=None, help="default: 2 x rank")
  p.add_argument("--adapter-dtype", default="float32", help="dtype of A and B (the LoRA paper: float16)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=None, help="default: the model's context (GPT presets) or 512")
  p.add_argument("--dtype", default=None, help="weights dtype (default: the preset's, or float32 for HF models)")
  p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
  p.add_argument("--methods", default="full,lora,dora,qlora")
  p.add_argument("--plot", default="", help="write a stacked bar chart (PNG)")
  p.add_argument("--json", default="", help="write the reports as JSON")
  args = p.parse_args(argv)
  try:
    result = _cli.run(args)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(result["table"])
  for name, why in result["skipped"].items():
    print(f"{name}: skipped ({why})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({k: v for k, v in result.items() if k != "table"}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
