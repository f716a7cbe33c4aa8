"""The LoRA paper's GPT-3 175B headline from shapes alone (jlora.memory, XLA compile-time analysis).

GPT-3 175B (96 layers, d=12288, 96 heads, context 2048, vocab 50257, fp16 weights), Adam,
batch 1 x 2048, layers rematerialised; LoRA r=4 (fp16 adapters) on W_q and W_v vs full
fine-tuning (and DoRA, and QLoRA when jlora.quant is installed). The paper (Hu et al. 2021,
§4.2) reports training VRAM 1.2 TB -> 350 GB and checkpoints 350 GB -> 35 MB.

  python benchmarks/memory_gpt3.py
  python benchmarks/memory_gpt3.py --smoke     # the gpt-tiny preset, batch 1x16: does it still run?

Results go to benchmarks/results/memory_gpt3_175b.json (and a .png chart); --smoke writes
nothing, or the JSON to --out and the chart beside it.
"""

from __future__ import annotations

import argparse
import os

from _common import RESULTS_DIR, add_smoke_flag, write_result

from jlora.memory import _cli


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_smoke_flag(ap)
  cli = ap.parse_args(argv)
  plot = os.path.join(RESULTS_DIR, "memory_gpt3_175b.png")
  if cli.out:
    plot = os.path.splitext(cli.out)[0] + ".png"
  elif cli.smoke:
    plot = ""
  args = argparse.Namespace(model="gpt-tiny" if cli.smoke else "gpt3-175b", targets="query,value", rank=4, alpha=8.0,
                            adapter_dtype="float16", batch=1, seq=16 if cli.smoke else 2048, dtype=None,
                            optimizer="adam", methods="full,lora,dora,qlora", plot=plot)
  if plot:
    os.makedirs(os.path.dirname(os.path.abspath(plot)), exist_ok=True)
  result = _cli.run(args)
  print(result["table"])
  write_result("memory_gpt3_175b", {k: v for k, v in result.items() if k != "table"}, args=cli)


if __name__ == "__main__":
  main()
