"""Record types and the parsers that turn a row into one, checking it.

Accepted row shapes (keys of the JSON object; the first that matches wins):

SFT (``parse_sft``):
  * ``messages``: OpenAI chat, a list of ``{"role", "content", ...}`` (roles
    ``system``, ``user``, ``assistant``, ``tool``; other keys such as ``tool_calls``,
    ``reasoning_content``, ``name``, ``tool_call_id`` go to the template as given).
  * ``conversations``: ShareGPT, a list of ``{"from", "value"}``. Roles map as
    ``human``/``user`` -> ``user``, ``gpt``/``assistant`` -> ``assistant``,
    ``system`` -> ``system``, ``tool``/``observation``/``function_response`` ->
    ``tool``, and ``function_call`` (its value the JSON of ``{"name", "arguments"}``,
    or a list of them) -> an ``assistant`` message whose ``tool_calls`` hold the
    call. TRL only renames the keys, leaving ``human``/``gpt``, which no template
    renders as user/assistant.
  * ``instruction``/``output`` (Alpaca, with optional ``input``): the prompt is the
    instruction, plus ``"\\n"`` and the input when the input is not empty.
  * ``prompt``/``completion``: strings (``Prompted``) or message lists (a ``Chat``
    whose prompt messages are context only).
  * ``input``/``target``: strings.
  * ``text``: a string, trained on whole.

Preference (``parse_preference``): ``prompt`` (optional), ``chosen``, ``rejected``,
all strings ("standard") or all message lists ("conversational"). Without a
prompt, the prompt is the longest common prefix of chosen and rejected (see
``extract_prompt``).

Unpaired preference (``parse_unpaired``): ``prompt``, ``completion``, ``label`` (a JSON
boolean: true = desirable).

Any record may carry ``tools`` (a list of tool schemas, or its JSON text) and
``chat_template_kwargs`` (an object, e.g. ``{"enable_thinking": false}``), both
passed to the chat template, as TRL does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Union

from jlora.data._errors import DataError
from jlora.data._read import Row

ROLES = ("system", "user", "assistant", "tool")  # the roles a message may have
SHAREGPT_ROLES = {  # ShareGPT "from" values and the role each becomes
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "tool": "tool", "observation": "tool", "function_response": "tool", "function_call": "assistant",
}
_FIX = "fix the record or pass --skip-bad-lines"


@dataclasses.dataclass(frozen=True)
class Message:
  """One chat message, as the chat template will see it (``as_dict``).

  Example:
    >>> from jlora.data import Message
    >>> Message("assistant", "4", {"reasoning_content": "2+2"}).as_dict()
    {'role': 'assistant', 'content': '4', 'reasoning_content': '2+2'}
  """

  role: str  # one of ROLES
  content: Any  # a string, a list of {"type": "text", "text": ...} parts, or None (an assistant tool call)
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # other keys (tool_calls, ...)

  def as_dict(self) -> dict[str, Any]:
    """The message as a chat template reads it: role, content and the extra keys."""
    return {"role": self.role, "content": self.content, **self.extra}


Messages = tuple[Message, ...]


@dataclasses.dataclass(frozen=True)
class Chat:
  """A conversation trained on its assistant turns (rendered with the tokenizer's chat template).

  Example:
    >>> from jlora.data import Chat, Message
    >>> chat = Chat((Message("user", "2+2?"), Message("assistant", "4")))
    >>> [m.role for m in chat.messages]
    ['user', 'assistant']
  """

  messages: Messages
  tools: tuple[Any, ...] | None = None  # tool schemas passed to the template (the record's "tools")
  template_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # "chat_template_kwargs"
  prompt_turns: int = 0  # the first prompt_turns messages are context only: their assistant turns are not trained


@dataclasses.dataclass(frozen=True)
class Prompted:
  """A prompt (never trained) and its completion (trained, with an EOS); ``prompt=""`` for plain text.

  Example:
    >>> from jlora.data import Prompted
    >>> Prompted("2+2=", "4").completion
    '4'
  """

  prompt: str
  completion: str


Content = Union[str, Messages]  # a string ("standard") or messages ("conversational")


@dataclasses.dataclass(frozen=True)
class Preference:
  """A prompt and two answers, ``chosen`` preferred to ``rejected``; all strings or all messages.

  Example:
    >>> from jlora.data import Preference
    >>> Preference("The sky is", " blue.", " green.").chosen
    ' blue.'
  """

  prompt: Content
  chosen: Content
  rejected: Content
  tools: tuple[Any, ...] | None = None
  template_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Unpaired:
  """A prompt and one answer labelled desirable (``True``) or undesirable (KTO).

  Example:
    >>> from jlora.data import Unpaired
    >>> Unpaired("The sky is", " blue.", True).label
    True
  """

  prompt: Content
  completion: Content
  label: bool
  tools: tuple[Any, ...] | None = None
  template_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


Record = Union[Chat, Prompted, Preference, Unpaired]


@dataclasses.dataclass(frozen=True)
class Example:
  """A record and where it came from (``"file:line"`` or ``"file[i]"``).

  Example:
    >>> from jlora.data import Example, Prompted
    >>> Example("d.jsonl:1", Prompted("2+2=", "4")).where
    'd.jsonl:1'
  """

  where: str
  record: Record


class _Bad(Exception):
  """A problem with a record, before the row's ``where`` is prefixed."""


def _raise(row: Row, problem: str) -> DataError:
  return DataError(f"{row.where}: {problem}; {_FIX}")


def parse_sft(row: Row) -> Chat | Prompted:
  """The supervised record a row holds (see the module docstring for the shapes).

  Raises:
    DataError: ``"<where>: <problem>; fix the record or pass --skip-bad-lines"``:
      no known fields, a field of the wrong type, an empty completion, an unknown
      role, a message without content, or a conversation without an assistant message.

  Example:
    >>> from jlora.data import Row, parse_sft
    >>> parse_sft(Row("d.jsonl:1", {"instruction": "Add", "input": "2+2", "output": "4"}))
    Prompted(prompt='Add\\n2+2', completion='4')
  """
  try:
    return _parse_sft(row.value)
  except _Bad as e:
    raise _raise(row, str(e)) from None


def _parse_sft(obj: Any) -> Chat | Prompted:
  obj = _object(obj)
  extras = _extras(obj)
  for key in ("messages", "conversations"):
    if key in obj:
      messages = _messages(obj[key], key)
      _needs_assistant(messages, key)
      return Chat(messages, **extras)
  if "instruction" in obj and "output" in obj:
    prompt = _string(obj, "instruction")
    if obj.get("input"):
      prompt = f"{prompt}\n{_string(obj, 'input')}"
    return Prompted(prompt, _completion(obj, "output"))
  if "prompt" in obj and "completion" in obj:
    if isinstance(obj["prompt"], list) or isinstance(obj["completion"], list):
      prompt, completion = _messages(obj["prompt"], "prompt"), _messages(obj["completion"], "completion")
      _needs_assistant(completion, "completion")
      return Chat(prompt + completion, prompt_turns=len(prompt), **extras)
    return Prompted(_string(obj, "prompt"), _completion(obj, "completion"))
  if "input" in obj and "target" in obj:
    return Prompted(_string(obj, "input"), _completion(obj, "target"))
  if "text" in obj:
    return Prompted("", _completion(obj, "text"))
  hint = ("; this is a preference record (train it with a preference objective)"
          if "chosen" in obj and "rejected" in obj else "")
  raise _Bad(f"no known fields (have {sorted(obj)}); use messages, conversations, prompt/completion, "
             f"input/target, instruction/output or text{hint}")


def parse_preference(row: Row) -> Preference:
  """The preference pair a row holds, with TRL's implicit prompt when it has none.

  ``chosen``, ``rejected`` and ``prompt`` are all strings or all message lists. A
  string ``prompt`` beside conversational answers is ignored and the prompt is
  extracted from the answers, as TRL's ``maybe_extract_prompt`` does.

  Raises:
    DataError: a missing field, mixed kinds, ``chosen`` equal to ``rejected``, a
      conversational pair without a common prompt, or an answer that does not
      start with an assistant message.

  Example:
    >>> from jlora.data import Row, parse_preference
    >>> parse_preference(Row("d.jsonl:1", {"chosen": "The sky is blue.", "rejected": "The sky is green."}))
    Preference(prompt='The sky is', chosen=' blue.', rejected=' green.', tools=None, template_kwargs={})
  """
  try:
    return _parse_preference(row.value)
  except _Bad as e:
    raise _raise(row, str(e)) from None


def _parse_preference(obj: Any) -> Preference:
  obj = _object(obj)
  extras = _extras(obj)
  for key in ("chosen", "rejected"):
    if key not in obj:
      raise _Bad(f"missing field {key!r} (have {sorted(obj)}); a preference record needs chosen and rejected "
                 "(and optionally prompt)")
  conversational = isinstance(obj["chosen"], list)
  if conversational != isinstance(obj["rejected"], list):
    raise _Bad("chosen and rejected must both be strings or both be message lists")
  if conversational:
    chosen, rejected = _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")
  else:
    chosen, rejected = _string(obj, "chosen"), _string(obj, "rejected")
  if chosen == rejected:
    raise _Bad("chosen equals rejected; a preference pair needs two different answers")
  if "prompt" in obj and isinstance(obj["prompt"], list) == conversational:
    prompt = _messages(obj["prompt"], "prompt") if conversational else _string(obj, "prompt")
  elif "prompt" in obj and not conversational:
    raise _Bad("prompt is a message list but chosen and rejected are strings; give all three in one form")
  else:
    prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if conversational and not prompt:
      raise _Bad("chosen and rejected differ from their first message, so they hold no common prompt; "
                 "give the prompt messages in a prompt field")
  if conversational:
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
      if answer[0].role != "assistant":
        raise _Bad(f"{key} must start with an assistant message after the prompt, found role {answer[0].role!r}")
  return Preference(prompt, chosen, rejected, **extras)


def parse_unpaired(row: Row) -> Unpaired:
  """The labelled (prompt, completion) a row holds, for KTO.

  Raises:
    DataError: a missing field, mixed kinds, an empty completion, or a label that
      is not a JSON boolean.

  Example:
    >>> from jlora.data import Row, parse_unpaired
    >>> parse_unpaired(Row("d.jsonl:1", {"prompt": "The sky is", "completion": " blue.", "label": True}))
    Unpaired(prompt='The sky is', completion=' blue.', label=True, tools=None, template_kwargs={})
  """
  try:
    return _parse_unpaired(row.value)
  except _Bad as e:
    raise _raise(row, str(e)) from None


def _parse_unpaired(obj: Any) -> Unpaired:
  obj = _object(obj)
  extras = _extras(obj)
  for key in ("prompt", "completion", "label"):
    if key not in obj:
      raise _Bad(f"missing field {key!r} (have {sorted(obj)}); an unpaired preference record needs prompt, "
                 "completion and label (or chosen and rejected)")
  if not isinstance(obj["label"], bool):
    raise _Bad(f"label must be true or false, got {obj['label']!r}")
  conversational = isinstance(obj["completion"], list)
  if conversational != isinstance(obj["prompt"], list):
    raise _Bad("prompt and completion must both be strings or both be message lists")
  if conversational:
    prompt, completion = _messages(obj["prompt"], "prompt"), _messages(obj["completion"], "completion")
    if completion[0].role != "assistant":
      raise _Bad(f"completion must start with an assistant message, found role {completion[0].role!r}")
  else:
    prompt, completion = _string(obj, "prompt"), _completion(obj, "completion")
  return Unpaired(prompt, completion, obj["label"], **extras)


def extract_prompt(chosen: Content, rejected: Content) -> tuple[Content, Content, Content]:
  """``(prompt, chosen, rejected)``: the common prefix of two answers split off as the prompt.

  As TRL's ``extract_prompt``: the prefix is counted in characters (strings) or
  messages; a space just before the first difference goes to the answers; when one
  answer is a prefix of the other, the last common element stays in the answers so
  that neither is empty. (TRL, when the very first element differs and the chosen
  answer ends with a space, returns all of chosen but its last character as the
  prompt; here the prompt is then empty.)

  Example:
    >>> from jlora.data import extract_prompt
    >>> extract_prompt("The sky is blue.", "The sky is green.")
    ('The sky is', ' blue.', ' green.')
  """
  n = min(len(chosen), len(rejected))
  i = next((k for k in range(n) if chosen[k] != rejected[k]), n)
  if i == n:
    i = max(n - 1, 0)
  elif i > 0 and chosen[i - 1] == " ":
    i -= 1
  return chosen[:i], chosen[i:], rejected[i:]


def unpair(examples: Sequence[Example]) -> list[Example]:
  """Preference examples as unpaired ones: (prompt, chosen, True) then (prompt, rejected, False).

  Unpaired examples pass through. The two halves of a pair stay next to each other
  (``where`` gains `` (chosen)`` / `` (rejected)``); TRL's ``unpair_preference_dataset``
  puts a batch's chosen answers before its rejected ones instead.

  Example:
    >>> from jlora.data import Example, Preference, unpair
    >>> [(e.where, e.record.label) for e in unpair([Example("d.jsonl:1", Preference("Q", " a", " b"))])]
    [('d.jsonl:1 (chosen)', True), ('d.jsonl:1 (rejected)', False)]
  """
  out = []
  for ex in examples:
    r = ex.record
    if isinstance(r, Preference):
      out.append(Example(f"{ex.where} (chosen)", Unpaired(r.prompt, r.chosen, True, r.tools, r.template_kwargs)))
      out.append(Example(f"{ex.where} (rejected)",
                         Unpaired(r.prompt, r.rejected, False, r.tools, r.template_kwargs)))
    else:
      out.append(ex)
  return out


def _object(obj: Any) -> dict[str, Any]:
  if not isinstance(obj, dict):
    raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
  return obj


def _string(obj: dict[str, Any], key: str) -> str:
  value = obj[key]
  if not isinstance(value, str):
    raise _Bad(f"{key} must be a string, got {type(value).__name__}")
  return value


def _completion(obj: dict[str, Any], key: str) -> str:
  value = _string(obj, key)
  if not value:
    raise _Bad(f"empty {key}")
  return value


def _extras(obj: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  tools = obj.get("tools")
  if isinstance(tools, str):
    try:
      tools = json.loads(tools)
    except json.JSONDecodeError as e:
      raise _Bad(f"tools is a string but not valid JSON ({e.msg})") from None
  if tools is not None:
    if not isinstance(tools, list):
      raise _Bad(f"tools must be a list of tool schemas (or its JSON text), got {type(tools).__name__}")
    out["tools"] = tuple(tools) or None
  kwargs = obj.get("chat_template_kwargs")
  if kwargs is not None:
    if not isinstance(kwargs, dict):
      raise _Bad(f"chat_template_kwargs must be an object, got {type(kwargs).__name__}")
    out["template_kwargs"] = dict(kwargs)
  return out


def _needs_assistant(messages: Messages, key: str) -> None:
  if not any(m.role == "assistant" for m in messages):
    roles = ", ".join(m.role for m in messages)
    raise _Bad(f"{key} has no assistant message (roles: {roles}); supervised training needs at least one")


def _messages(value: Any, key: str) -> Messages:
  """A list of OpenAI (role/content) or ShareGPT (from/value) messages, checked."""
  if not isinstance(value, list) or not value:
    raise _Bad(f"{key} must be a non-empty list of messages, got {_describe(value)}")
  return tuple(_message(m, f"{key}[{i}]") for i, m in enumerate(value))


def _describe(value: Any) -> str:
  return "an empty list" if value == [] else type(value).__name__


def _message(m: Any, at: str) -> Message:
  if not isinstance(m, dict):
    raise _Bad(f"{at} must be an object with role and content, got {type(m).__name__}")
  if "from" in m and "role" not in m:
    return _sharegpt_message(m, at)
  if "role" not in m:
    raise _Bad(f"{at} has no role (keys {sorted(m)}); give role and content (or ShareGPT's from and value)")
  role = m["role"]
  if role not in ROLES:
    raise _Bad(f"{at} has role {role!r}; use one of {', '.join(ROLES)}")
  extra = {k: v for k, v in m.items() if k not in ("role", "content")}
  content = m.get("content")
  if content is None and not (role == "assistant" and extra.get("tool_calls")):
    raise _Bad(f"{at} ({role}) has no content; give content (only an assistant message with tool_calls "
               "may omit it)")
  _check_content(content, at)
  return Message(role, content, extra)


def _check_content(content: Any, at: str) -> None:
  if content is None or isinstance(content, str):
    return
  if isinstance(content, list):
    for j, part in enumerate(content):
      if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise _Bad(f"{at}.content[{j}] is a {kind!r} part; only text parts ({{'type': 'text', 'text': ...}}) "
                   "are supported")
    return
  raise _Bad(f"{at}.content must be a string or a list of text parts, got {type(content).__name__}")


def _sharegpt_message(m: dict[str, Any], at: str) -> Message:
  source = m["from"]
  if source not in SHAREGPT_ROLES:
    raise _Bad(f"{at} is from {source!r}; ShareGPT roles are {', '.join(SHAREGPT_ROLES)}")
  if not isinstance(m.get("value"), str):
    raise _Bad(f"{at} ({source}) needs a string value")
  extra = {k: v for k, v in m.items() if k not in ("from", "value")}
  if source != "function_call":
    return Message(SHAREGPT_ROLES[source], m["value"], extra)
  try:
    calls = json.loads(m["value"])
  except json.JSONDecodeError as e:
    raise _Bad(f"{at} (function_call) must hold the JSON of {{name, arguments}} ({e.msg})") from None
  calls = calls if isinstance(calls, list) else [calls]
  if not all(isinstance(c, dict) and "name" in c for c in calls):
    raise _Bad(f"{at} (function_call) must hold the JSON of {{name, arguments}} or a list of them")
  tool_calls = [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
                for c in calls]
  return Message("assistant", "", {**extra, "tool_calls": tool_calls})
