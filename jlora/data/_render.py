"""The tokenizer's chat template and tokenization, as the rest of ``jlora.data`` uses them.

Tokenizers are duck-typed Hugging Face tokenizers (``transformers`` 4.57 or 5.x):
``__call__``, ``apply_chat_template``, ``chat_template``, ``eos_token``/``eos_token_id``,
``pad_token_id``, ``decode``; chat masks also need a fast tokenizer
(``backend_tokenizer``) for character offsets.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from jlora.data._errors import DataError


def template_name(tokenizer: Any) -> str:
  """How errors name the chat template: ``"the chat template of <tokenizer path>"``."""
  name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
  return f"the chat template of {name}"


def has_chat_template(tokenizer: Any) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


class TemplateFailure(Exception):
  """The template raised while rendering ``messages[:upto]`` (``generation_prompt``: with the generation prompt)."""

  def __init__(self, error: Exception, upto: int, generation_prompt: bool):
    super().__init__(str(error))
    self.error = error
    self.upto = upto
    self.generation_prompt = generation_prompt


def _template_errors() -> tuple[type[Exception], ...]:
  try:
    import jinja2
  except ImportError as e:  # transformers renders templates with jinja2 (jlora's [hf] extra installs it)
    raise DataError(f"chat templates need jinja2 ({e}); install it with: pip install jinja2") from None
  # A template's raise_exception() and its undefined names raise TemplateError; "+" on None raises
  # TypeError; an index or key the data lacks raises a LookupError.
  return (jinja2.TemplateError, TypeError, LookupError)


def render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], upto: int, *, generation_prompt: bool,
           tools: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None) -> str:
  """The text of ``messages[:upto]`` through the chat template.

  Raises:
    TemplateFailure: the template raised (the caller names the record and turn).
  """
  errors = _template_errors()
  if upto == 0:  # transformers renders no empty conversation
    raise TemplateFailure(ValueError("an empty conversation cannot be rendered"), 0, generation_prompt)
  try:
    return tokenizer.apply_chat_template(list(messages[:upto]), tools=list(tools) if tools else None,
                                         tokenize=False, add_generation_prompt=generation_prompt,
                                         **dict(kwargs or {}))
  except errors as e:
    raise TemplateFailure(e, upto, generation_prompt) from None


def chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, generation_prompt: bool,
             tools: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None) -> list[int]:
  """Token ids of ``messages`` through the chat template, as TRL's ``_tokenize`` gets them.

  ``return_dict=True`` and ``["input_ids"]``: transformers 5 returns a BatchEncoding.

  Raises:
    TemplateFailure: the template raised.
  """
  errors = _template_errors()
  try:
    out = tokenizer.apply_chat_template(list(messages), tools=list(tools) if tools else None, tokenize=True,
                                        return_dict=True, add_generation_prompt=generation_prompt,
                                        **dict(kwargs or {}))
  except errors as e:
    raise TemplateFailure(e, len(messages), generation_prompt) from None
  return [int(i) for i in out["input_ids"]]


# Copies of tokenizers' Rust tokenizers without their post-processor (see encode_with_offsets).
_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """Token ids of ``text`` (no special tokens added, as ``apply_chat_template`` tokenizes) and
  each token's character span.

  The spans come from the tokenizer's Rust tokenizer without its post-processor:
  with ``add_special_tokens=False`` a post-processor adds no token, but a byte-level
  one with ``trim_offsets`` moves a token's start past its leading space, which
  would make a boundary inside " word" look like a token boundary.

  Raises:
    DataError: the tokenizer is not a fast tokenizer (it has no offsets).
  """
  backend = require_fast(tokenizer)
  # Rebuilt when the tokenizer gets another Rust tokenizer or more tokens (add_tokens changes it in place).
  key = (id(backend), backend.get_vocab_size(with_added_tokens=True))
  copy = _BACKENDS.get(tokenizer)
  if copy is None or copy[0] != key:
    plain = type(backend).from_str(backend.to_str())
    plain.post_processor = None
    if hasattr(backend, "encode_special_tokens"):
      plain.encode_special_tokens = backend.encode_special_tokens
    copy = (key, plain)
    _BACKENDS[tokenizer] = copy
  enc = copy[1].encode(text, add_special_tokens=False)
  return list(enc.ids), list(enc.offsets)


def require_fast(tokenizer: Any) -> Any:
  """The tokenizer's Rust tokenizer.

  Raises:
    DataError: the tokenizer is not a fast tokenizer (it has no character offsets).
  """
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None or not getattr(tokenizer, "is_fast", False):
    raise DataError(f"chat masks need a fast tokenizer (with character offsets); {type(tokenizer).__name__} "
                    "is not one: load the tokenizer with AutoTokenizer.from_pretrained(..., use_fast=True) "
                    "from a directory with tokenizer.json")
  return backend


def token_boundary(offsets: Sequence[tuple[int, int]], char: int) -> int | None:
  """The ``k`` with tokens ``[:k]`` covering exactly ``text[:char]``; None when a token straddles ``char``.

  Example:
    >>> token_boundary([(0, 1), (1, 3), (3, 4)], 3), token_boundary([(0, 1), (1, 3), (3, 4)], 2)
    (2, None)
  """
  starts = [s for s, _ in offsets]
  k = bisect.bisect_left(starts, char)
  if k < len(offsets) and starts[k] != char:
    return None
  if k > 0 and offsets[k - 1][1] > char:
    return None
  return k


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
  """How many leading ids ``a`` and ``b`` share (TRL's ``common_prefix_length``).

  Example:
    >>> common_prefix_length([1, 2, 3], [1, 2, 4, 5])
    2
  """
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n
