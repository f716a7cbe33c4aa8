"""The README's library quickstart runs as written."""

import os
import re


def test_quickstart_runs():
  with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
    text = f.read()
  section = text.split("## Library quickstart", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  scope: dict = {}
  exec(compile(code, "README.md quickstart", "exec"), scope)
  assert scope["y"].shape == (4, 8)
  assert scope["jlora"].count(scope["lora_params"]).trainable == 4 * (16 + 64) + 4 * (64 + 8)
