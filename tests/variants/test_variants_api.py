import jlora
import jlora.memory
import jlora.variants


def test_every_exported_name_resolves():
  for mod in (jlora.variants, jlora.memory):
    for name in mod.__all__:
      assert getattr(mod, name) is not None, (mod.__name__, name)
    assert sorted(mod.__all__) == sorted(set(mod.__all__))
  for name in ("DoRA", "AdaLoRA", "adalora", "adalora_finalize", "orthogonality_penalty", "extract", "to_lora",
               "memory_report"):
    assert name in jlora.__all__


def test_variants_are_found_by_name():
  for v in (jlora.DoRA(), jlora.AdaLoRA(), jlora.variants.Residual(inner=jlora.DoRA())):
    assert jlora.Variant.from_json(v.to_json()) == v
