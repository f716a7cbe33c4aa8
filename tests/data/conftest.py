"""Shared fixtures: the bundled byte-level tokenizer, with the four test templates' special tokens."""

import os

import pytest

import jlora
from data_templates import ADDED_TOKENS, SPECIAL_TOKENS, TEMPLATES

TINY_BASE = os.path.join(os.path.dirname(jlora.__file__), "assets", "tiny-base")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """The bundled tokenizer (1024 byte-level BPE tokens) with the templates' special tokens, saved once."""
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(TINY_BASE)
  tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
  tok.add_tokens(ADDED_TOKENS)
  path = str(tmp_path_factory.mktemp("tokenizer"))
  tok.save_pretrained(path)
  return path


@pytest.fixture(scope="session")
def make_tokenizer(tokenizer_dir):
  """``make_tokenizer(template_or_name)``: a fresh tokenizer with that chat template (a name of TEMPLATES)."""
  from transformers import AutoTokenizer

  def make(template=None):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = TEMPLATES[template][0] if template in TEMPLATES else template
    return tok

  return make


@pytest.fixture(scope="session")
def plain_tokenizer():
  """The bundled tokenizer without its chat template (a base model's tokenizer that has none)."""
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(TINY_BASE)
  tok.chat_template = None
  return tok
