import jlora


def test_every_exported_name_resolves():
  for name in jlora.__all__:
    assert getattr(jlora, name) is not None, name
  assert sorted(jlora.__all__) == sorted(set(jlora.__all__))
