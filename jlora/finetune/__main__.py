"""``python -m jlora.finetune [--config FILE] [--option value ...]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
  from jlora.finetune.config import parse_args
  from jlora.finetune.train import run

  cfg, ns = parse_args(argv)
  run(cfg, resume=ns.resume)
  return 0


if __name__ == "__main__":
  sys.exit(main())
