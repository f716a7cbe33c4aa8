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


def test_models_section_runs(tmp_path):
  with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
    text = f.read()
  section = text.split("## Models", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1).replace('"/tmp/', f'"{tmp_path}/')
  scope: dict = {}
  cwd = os.getcwd()
  os.chdir(str(tmp_path))  # the snippet finds the bundled model from anywhere (jlora.models.TINY_BASE)
  try:
    exec(compile(code, "README.md models", "exec"), scope)
  finally:
    os.chdir(cwd)
  assert scope["grads"]["layers"]["mlp"]["up_proj"]["kernel"].a is not None
  assert scope["logits"].shape == (1, 4, 1024)
  assert len(scope["out"][0]) <= 8
  assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
  assert (tmp_path / "merged" / "model.safetensors").exists()
