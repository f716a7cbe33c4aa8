import jlora
import jlora.multi


def test_every_exported_name_resolves():
  for name in jlora.multi.__all__:
    assert getattr(jlora.multi, name) is not None, name
  assert sorted(jlora.multi.__all__) == sorted(set(jlora.multi.__all__))
  assert jlora.stack is jlora.multi.stack and jlora.compose is jlora.multi.compose
  assert jlora.lorahub is jlora.multi.lorahub and jlora.Bank is jlora.multi.Bank


def test_readme_many_adapters_example_runs():
  import os
  import re

  with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")) as f:
    text = f.read()
  section = text.split("## Many adapters on one base", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  scope: dict = {}
  exec(compile(code, "README.md many adapters", "exec"), scope)
  assert scope["y"].shape == (4, 8) and scope["hub"].weights.shape == (3,)
  assert jlora.multi.slots(scope["bank"]) == [0, 1, 2]
  assert scope["mix"]["layers_0"]["kernel"].spec.rank == 12
