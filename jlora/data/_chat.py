"""Assistant masks from the tokenizer's own chat template, by rendering prefixes.

For assistant turn ``i`` of a conversation ``m``, with ``render`` the chat template:

* ``p_i = render(m[:i], add_generation_prompt=True)``: everything the model is
  given before it answers;
* ``q_i = render(m[:i+1])``: the same and the answer, through its end of turn.

The trained text of turn ``i`` is ``q_i[len(p_i):]``: the answer and the
end-of-turn token (and whatever the template writes after it, such as ChatML's
newline), never the role header, and no system, user or tool text. No
``{% generation %}`` tags are needed. The mask is exact when

1. ``p_i`` is a prefix of ``q_i`` (the generation prompt is the turn's header);
   otherwise no mask is exact for the turn and this is an error naming the template
   and the turn (e.g. a template that pre-fills a reasoning block in the
   generation prompt but not in the conversation);
2. ``q_i`` is a prefix of the rendered sequence the turn is trained in; a template
   that rewrites history breaks it (Qwen3 drops the reasoning of turns before the
   last user message, so a turn renders differently once a later user turn exists);
3. the tokenization of that sequence has token boundaries at both ends of the span
   (else BPE merged the header with the answer, or the answer with what follows:
   an error naming the template and the turn).

When (2) fails for some turns, the conversation is trained as several sequences:
first the whole conversation, training the turns that pass; then
``render(m[:j+1])`` for the last turn ``j`` that has not passed, training the
remaining turns that pass there (``j`` always does); and so on. Each turn is
trained exactly once, in a rendering that is a prefix of what the template
renders at that point of the conversation, which is exact by construction.

An empty reasoning block at the start of a trained span (by default
``<think>`` + whitespace + ``</think>`` + whitespace, the block Qwen3 writes for a
final turn without reasoning) is not trained.

Also checked: a system, user or tool message whose content the template leaves
out of the rendering entirely (a role it silently skips), and a trained
assistant turn whose reasoning (``reasoning_content``, ``thinking`` or
``reasoning``) does not appear in its span (the template reads another key).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from jlora.data._errors import DataError
from jlora.data._records import Chat
from jlora.data._render import TemplateFailure, encode_with_offsets, render, template_name, token_boundary

EMPTY_REASONING = r"<think>\s*</think>\s*"  # default empty_reasoning pattern (matched at a span's start)
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # message keys that hold reasoning


@dataclasses.dataclass(frozen=True)
class ChatSequence:
  """One token sequence of a conversation and which of its tokens are trained."""

  ids: list[int]
  mask: list[int]  # 1 on the trained tokens
  turns: tuple[int, ...]  # the assistant turns (indices into the messages) trained here


def chat_sequences(chat: Chat, tokenizer: Any, *, where: str, train_on: str = "all",
                   empty_reasoning: str | None = EMPTY_REASONING) -> list[ChatSequence]:
  """The sequences a conversation trains as (one, unless the template rewrites history).

  Raises:
    DataError: naming ``where`` and the turn: the template refuses the
      conversation, the generation prompt differs from the turn's header, a BPE
      merge across a span boundary, a message the template leaves out, reasoning
      the template does not render, or a turn with nothing to train.
  """
  c = _Conversation(chat, tokenizer, where)
  try:
    return c.sequences(train_on, re.compile(empty_reasoning) if empty_reasoning else None)
  except TemplateFailure as e:
    raise c.template_error(e) from None


class _Conversation:
  def __init__(self, chat: Chat, tokenizer: Any, where: str):
    self.chat = chat
    self.tok = tokenizer
    self.where = where
    self.msgs = [m.as_dict() for m in chat.messages]
    self._cache: dict[tuple[int, bool], str] = {}

  def render(self, upto: int, generation_prompt: bool = False) -> str:
    key = (upto, generation_prompt)
    if key not in self._cache:
      self._cache[key] = render(self.tok, self.msgs, upto, generation_prompt=generation_prompt,
                                tools=self.chat.tools, kwargs=self.chat.template_kwargs)
    return self._cache[key]

  def error(self, turn: int, problem: str, fix: str) -> DataError:
    role = self.msgs[turn]["role"] if turn < len(self.msgs) else "?"
    return DataError(f"{self.where}: turn {turn} ({role}): {problem} ({template_name(self.tok)}); {fix}")

  def template_error(self, e: TemplateFailure) -> DataError:
    if e.upto == 0:
      return self.error(0, "an assistant turn that opens the conversation has no prompt to render before it "
                        "(transformers renders no empty conversation)",
                        "start the conversation with a user (or system) message")
    turn = e.upto - 1
    if not e.generation_prompt and e.upto == len(self.msgs):  # the whole conversation: find the first bad turn
      for k in range(1, len(self.msgs)):
        try:
          self.render(k)
        except TemplateFailure:
          turn = k - 1
          break
    elif e.generation_prompt:
      turn = e.upto
    return self.error(turn, f"the template refuses the conversation here ({e})",
                      "fix the roles or their order to what the template accepts, or pass --skip-bad-lines")

  def sequences(self, train_on: str, empty: re.Pattern | None) -> list[ChatSequence]:
    turns = [i for i, m in enumerate(self.msgs) if m["role"] == "assistant" and i >= self.chat.prompt_turns]
    if not turns:
      raise DataError(f"{self.where}: no assistant message to train (after the {self.chat.prompt_turns} prompt "
                      "messages); add one")
    if train_on == "last":
      turns = turns[-1:]
    full = self.render(len(self.msgs))
    self.check_rendered(full)
    spans = {}
    for i in turns:
      p, q = self.render(i, True), self.render(i + 1)
      if not q.startswith(p):
        n = _common(p, q)
        raise self.error(i, f"the generation prompt renders {p[n:n + 40]!r} where the conversation renders "
                         f"{q[n:n + 40]!r}, so no mask is exact for this turn",
                         "pass chat_template_kwargs that make them agree (e.g. the thinking mode), or use a "
                         "template whose generation prompt is the assistant header")
      spans[i] = (len(p), q)
    out, remaining, text = [], turns, full
    while remaining:
      here = [i for i in remaining if text.startswith(spans[i][1])]
      if here:
        out.append(self.sequence(text, here, spans, empty))
        remaining = [i for i in remaining if i not in here]
      if remaining:
        text = spans[remaining[-1]][1]
    return out

  def sequence(self, text: str, turns: list[int], spans: dict[int, tuple[int, str]],
               empty: re.Pattern | None) -> ChatSequence:
    ids, offsets = encode_with_offsets(self.tok, text)
    mask = [0] * len(ids)
    for i in turns:
      a, b = spans[i][0], len(spans[i][1])
      m = empty.match(text, a, b) if empty else None
      start = m.end() if m else a
      ka, kb = token_boundary(offsets, start), token_boundary(offsets, b)
      for k, at in ((ka, start), (kb, b)):
        if k is None:
          raise self.error(i, f"a token spans the boundary {text[max(at - 20, 0):at]!r} | {text[at:at + 20]!r} "
                           "(BPE merged across it), so no mask is exact for this turn",
                           "use a template that ends the header (and the turn) on a token boundary, such as "
                           "a newline or a special token")
      if kb <= ka:
        raise self.error(i, "the turn renders nothing to train", "give the assistant message content")
      self.check_reasoning(i, text[a:b])
      mask[ka:kb] = [1] * (kb - ka)
    return ChatSequence(ids, mask, tuple(turns))

  def check_rendered(self, full: str) -> None:
    """Refuses a system/user/tool message whose content the template leaves out (a role it skips)."""
    for k, m in enumerate(self.msgs):
      content = m["content"]
      if m["role"] == "assistant" or not isinstance(content, str) or not content.strip():
        continue
      s = content.strip()
      if s in full or json.dumps(s, ensure_ascii=False)[1:-1] in full:
        continue
      try:
        without = render(self.tok, self.msgs[:k] + self.msgs[k + 1:], len(self.msgs) - 1, generation_prompt=False,
                         tools=self.chat.tools, kwargs=self.chat.template_kwargs)
      except TemplateFailure:
        continue  # the message matters to the template
      if without == full:
        raise self.error(k, "the template renders nothing of this message (it skips the role here)",
                         "use a role the template renders, or drop the message")

  def check_reasoning(self, turn: int, span: str) -> None:
    for key in REASONING_KEYS:
      r = self.msgs[turn].get(key)
      if isinstance(r, str) and r.strip() and r.strip() not in span:
        raise self.error(turn, f"its reasoning ({key!r}) does not appear in the rendered turn; the template "
                         "reads reasoning from another key (Qwen3 reads 'reasoning_content')",
                         "rename the key to the one the template reads, or drop the reasoning")


def _common(a: str, b: str) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n
