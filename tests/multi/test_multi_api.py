import jlora
import jlora.multi


def test_every_exported_name_resolves():
  for name in jlora.multi.__all__:
    assert getattr(jlora.multi, name) is not None, name
  assert sorted(jlora.multi.__all__) == sorted(set(jlora.multi.__all__))
  assert jlora.stack is jlora.multi.stack and jlora.compose is jlora.multi.compose
  assert jlora.lorahub is jlora.multi.lorahub and jlora.Bank is jlora.multi.Bank
