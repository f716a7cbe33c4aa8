import jlora
import jlora.quant


def test_every_exported_name_resolves():
  for name in jlora.quant.__all__:
    assert getattr(jlora.quant, name) is not None, name
  for name in ("quantize", "dequantize", "NF4Weight", "merge_quantized"):
    assert name in jlora.__all__ and getattr(jlora, name) is getattr(jlora.quant, name)
  assert "loftq[_N]" in jlora._init_methods.init_method_names()

