"""Masks by prefix rendering (jlora.data._chat) against transformers' masks of {% generation %}-tagged twins."""

import pytest

from jlora.data import DataError, Row, parse_sft
from jlora.data._chat import chat_sequences
from data_templates import TEMPLATES

CALL = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather of a city", "parameters": CITY}}]

# (template, row, chat_sequences kwargs, trained turns of each expected sequence)
CASES = {
    "llama31 system, tool call, tool result, tools": ("llama31", {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": "", "tool_calls": CALL},
                     {"role": "tool", "content": "sunny, 21 C"}, {"role": "assistant", "content": "It is sunny."},
                     {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}],
        "tools": TOOLS}, {}, [(2, 4, 6)]),
    "llama31 last turn only": ("llama31", {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]},
        {"train_on": "last"}, [(3,)]),
    "gemma3 system folded, text parts": ("gemma3", {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": [{"type": "text", "text": "Goodbye."}]}]}, {}, [(2, 4)]),
    "sharegpt conversations": ("sharegpt", {
        "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                          {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"},
                          {"from": "gpt", "value": "Goodbye."}]}, {}, [(2, 4)]),
    "qwen3 reasoning on the last turn": ("qwen3", {
        "messages": [{"role": "system", "content": "Think."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]}, {}, [(2,)]),
    "qwen3 reasoning inside the content": ("qwen3", {
        "messages": [{"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "<think>\ntwo and two\n</think>\n\n4"}]}, {}, [(1,)]),
    "qwen3 empty reasoning": ("qwen3", {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}, {}, [(1,)]),
    "qwen3 thinking off": ("qwen3", {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "chat_template_kwargs": {"enable_thinking": False}}, {}, [(1,)]),
    "qwen3 multi-turn history rewriting": ("qwen3", {
        "messages": [{"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
                     {"role": "user", "content": "3+3?"},
                     {"role": "assistant", "content": "6", "reasoning_content": "three and three"},
                     {"role": "user", "content": "4+4?"},
                     {"role": "assistant", "content": "8", "reasoning_content": "four and four"}]},
        {}, [(5,), (3,), (1,)]),
    "qwen3 multi-turn, last turn only": ("qwen3", {
        "messages": [{"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4", "reasoning_content": "two and two"},
                     {"role": "user", "content": "3+3?"},
                     {"role": "assistant", "content": "6", "reasoning_content": "three and three"}]},
        {"train_on": "last"}, [(3,)]),
    "qwen3 tool call then answer": ("qwen3", {
        "messages": [{"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "content": "", "tool_calls": CALL},
                     {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
        "tools": TOOLS}, {}, [(3,), (1,)]),
}


def tagged(tok, name, messages, tools=None, **kwargs):
  """transformers' assistant mask of the tagged twin."""
  out = tok.apply_chat_template(messages, chat_template=TEMPLATES[name][1], tools=tools, tokenize=True,
                                return_dict=True, return_assistant_tokens_mask=True, **kwargs)
  return list(out["input_ids"]), list(out["assistant_masks"])


def runs(mask):
  """``[(start, end)]`` of the runs of ones."""
  out, start = [], None
  for i, m in enumerate(list(mask) + [0]):
    if m and start is None:
      start = i
    elif not m and start is not None:
      out.append((start, i))
      start = None
  return out


@pytest.fixture(scope="module")
def sequences(make_tokenizer):
  """Each case's record, tokenizer and sequences, computed once."""
  out = {}
  for case, (name, row, kwargs, _) in CASES.items():
    tok = make_tokenizer(name)
    record = parse_sft(Row("d.jsonl:1", row))
    out[case] = (name, tok, record, chat_sequences(record, tok, where="d.jsonl:1", **kwargs))
  return out


@pytest.mark.parametrize("case", CASES)
def test_prefix_mask_equals_the_tagged_twins_mask(sequences, case):
  name, tok, record, seqs = sequences[case]
  assert [s.turns for s in seqs] == CASES[case][3]
  msgs = [m.as_dict() for m in record.messages]
  for k, s in enumerate(seqs):
    # The first sequence is the whole conversation; a later one ends with the last turn it trains.
    upto = len(msgs) if k == 0 else max(s.turns) + 1
    ids, mask = tagged(tok, name, msgs[:upto], tools=list(record.tools or []) or None, **record.template_kwargs)
    assert s.ids == ids
    assistant_turns = [i for i, m in enumerate(msgs[:upto]) if m["role"] == "assistant"]
    tagged_runs = runs(mask)
    assert len(tagged_runs) == len(assistant_turns)
    want = [0] * len(ids)
    for turn, (a, b) in zip(assistant_turns, tagged_runs):
      if turn in s.turns:
        want[a:b] = [1] * (b - a)
    assert s.mask == want, case


END_OF_TURN = {"llama31": "<|eot_id|>", "qwen3": "<|im_end|>\n", "gemma3": "<end_of_turn>\n",
               "sharegpt": "<|endoftext|>\n\n"}


@pytest.mark.parametrize("case", CASES)
def test_end_of_turn_trained_and_never_system_user_tool_or_empty_reasoning(sequences, case):
  name, tok, record, seqs = sequences[case]
  context = [m.content for m in record.messages if m.role != "assistant"]
  for s in seqs:
    assert len(runs(s.mask)) == len(s.turns)
    for a, b in runs(s.mask):
      trained = tok.decode(s.ids[a:b])
      assert trained.endswith(END_OF_TURN[name]), trained
      assert not any(c in trained for c in context), trained
      assert "<think>\n\n</think>" not in trained
  untrained = "".join(tok.decode([t for t, m in zip(s.ids, s.mask) if not m]) for s in seqs)
  for c in context:
    assert c in untrained


def test_empty_reasoning_pattern_is_a_parameter(make_tokenizer):
  tok = make_tokenizer("qwen3")
  record = parse_sft(Row("d.jsonl:1", CASES["qwen3 empty reasoning"][1]))
  masked, kept = (chat_sequences(record, tok, where="w", empty_reasoning=p)[0] for p in (r"<think>\s*</think>\s*",
                                                                                          None))
  assert [tok.decode(kept.ids[a:b]) for a, b in runs(kept.mask)] == ["<think>\n\n</think>\n\n4<|im_end|>\n"]
  assert [tok.decode(masked.ids[a:b]) for a, b in runs(masked.mask)] == ["4<|im_end|>\n"]


def messages(*pairs, **extra):
  return {"messages": [{"role": r, "content": c} for r, c in pairs], **extra}


@pytest.mark.parametrize("template,row,match", [
    ("gemma3", messages(("user", "a"), ("user", "b"), ("assistant", "c")),
     r"^d.jsonl:7: turn 1 \(user\): the template refuses the conversation here \(Conversation roles must "
     r"alternate.*\) \(the chat template of .*\); fix the roles or their order"),
    ("gemma3", messages(("assistant", "Hi"), ("user", "b"), ("assistant", "c")),
     r"^d.jsonl:7: turn 0 \(assistant\): the template refuses the conversation here"),
    ("sharegpt", messages(("user", "a"), ("assistant", "b"), ("tool", "c"), ("assistant", "d")),
     r"^d.jsonl:7: turn 2 \(tool\): the template refuses the conversation here \(Unsupported role: tool\)"),
    ("{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\n{% elif m.role == 'assistant' %}"
     "A: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}",
     messages(("system", "Be brief."), ("user", "a"), ("assistant", "b")),
     r"^d.jsonl:7: turn 0 \(system\): the template renders nothing of this message \(it skips the role here\)"),
    ("llama31", messages(("assistant", "Hi"), ("user", "b"), ("assistant", "c")),
     r"^d.jsonl:7: turn 0 \(assistant\): an assistant turn that opens the conversation has no prompt to render "
     r"before it .*; start the conversation with a user \(or system\) message"),
    ("qwen3", {"messages": [{"role": "user", "content": "2+2?"},
                            {"role": "assistant", "content": "4", "thinking": "two and two"}]},
     r"^d.jsonl:7: turn 1 \(assistant\): its reasoning \('thinking'\) does not appear in the rendered turn.*"
     r"rename the key"),
    ("qwen3", {"messages": [{"role": "user", "content": "2+2?"},
                            {"role": "assistant", "content": "4", "reasoning_content": "two and two"}],
               "chat_template_kwargs": {"enable_thinking": False}},
     r"^d.jsonl:7: turn 1 \(assistant\): the generation prompt renders '\\n</think>\\n\\n' where the "
     r"conversation renders 'two and two.*', so no mask is exact for this turn"),
    ("{% for m in messages %}{% if m.role == 'user' %}Q {{ m.content }}\n{% else %}A {{ m.content }}"
     "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A {% endif %}",
     messages(("user", "a"), ("assistant", "the answer")),
     r"^d.jsonl:7: turn 1 \(assistant\): a token spans the boundary 'Q a\\nA ' \| 'the answer.*' \(BPE merged "
     r"across it\), so no mask is exact for this turn"),
    ("{% for m in messages %}{% if m.role == 'user' %}Q: {{ m.content }}\n{% else %}A: {{ m.content }}{% endif %}"
     "{% endfor %}{% if add_generation_prompt %}A: {% endif %}",
     messages(("user", "a"), ("assistant", "")),
     r"^d.jsonl:7: turn 1 \(assistant\): the turn renders nothing to train"),
])
def test_bad_conversations_name_the_line_and_turn(make_tokenizer, template, row, match):
  record = parse_sft(Row("d.jsonl:7", row))
  with pytest.raises(DataError, match=match):
    chat_sequences(record, make_tokenizer(template), where="d.jsonl:7")


def test_prompt_messages_are_context(make_tokenizer):
  tok = make_tokenizer("llama31")
  row = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Bye"}],
         "completion": [{"role": "assistant", "content": "Goodbye."}]}
  (s,) = chat_sequences(parse_sft(Row("d.jsonl:1", row)), tok, where="d.jsonl:1")
  assert s.turns == (3,)
  assert [tok.decode(s.ids[a:b]) for a, b in runs(s.mask)] == ["Goodbye.<|eot_id|>"]


def test_a_slow_tokenizer_is_refused(make_tokenizer):
  class Slow:
    is_fast = False
    chat_template = TEMPLATES["sharegpt"][0]
    name_or_path = "slow"

    def __getattr__(self, name):
      return getattr(make_tokenizer("sharegpt"), name)

  record = parse_sft(Row("d.jsonl:1", messages(("user", "a"), ("assistant", "b"))))
  with pytest.raises(DataError, match=r"chat masks need a fast tokenizer .*use_fast=True"):
    chat_sequences(record, Slow(), where="d.jsonl:1")


def test_tokens_added_after_a_first_use_are_seen(make_tokenizer):
  tok = make_tokenizer("{% for m in messages %}{{ m.role }}:\n{{ m.content }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:\n{% endif %}")
  record = parse_sft(Row("d.jsonl:1", messages(("user", "a"), ("assistant", "<answer>"))))
  before = chat_sequences(record, tok, where="d.jsonl:1")[0]
  tok.add_tokens(["<answer>"])
  after = chat_sequences(record, tok, where="d.jsonl:1")[0]
  assert len(after.ids) < len(before.ids) and tok.convert_tokens_to_ids("<answer>") in after.ids
  assert after.ids == tok.apply_chat_template(record_dicts(record), tokenize=True, return_dict=True)["input_ids"]


def record_dicts(record):
  return [m.as_dict() for m in record.messages]
