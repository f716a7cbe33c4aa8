"""The public API of jlora.data: closed, every name resolves, documented with an example."""

import inspect

import jlora.data


def test_every_exported_name_resolves_and_is_documented():
  assert sorted(jlora.data.__all__) == sorted(set(jlora.data.__all__))
  for name in jlora.data.__all__:
    obj = getattr(jlora.data, name)
    assert obj is not None, name
    if callable(obj):
      assert ">>>" in (inspect.getdoc(obj) or ""), f"{name} has no example"
