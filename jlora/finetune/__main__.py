"""``jlora-finetune [--config FILE] [--option value ...]`` (also ``python -m jlora.finetune``).

A user error (a bad flag, file or directory) prints one line on stderr and
exits with status 2; see ``jlora.finetune.cli``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jlora.finetune.cli import run_command
from jlora.finetune.config import PROG, config_template, parse_args
from jlora.finetune.train import run


def main(argv: Sequence[str] | None = None) -> int:
  def body() -> int:
    cfg, ns = parse_args(argv)
    if ns.print_config:
      print(config_template(cfg), end="")
      return 0
    run(cfg, resume=ns.resume, overwrite=ns.overwrite)
    return 0

  return run_command(PROG, body)


if __name__ == "__main__":
  sys.exit(main())
