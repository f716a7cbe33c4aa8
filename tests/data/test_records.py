"""Record shapes and their checks (jlora.data._records), and reading + parsing (jlora.data._load)."""

import json

import pytest

from jlora.data import (Chat, DataError, Example, Message, Preference, Prompted, Row, Unpaired, extract_prompt,
                        parse_preference, parse_sft, parse_unpaired, read_preference, read_sft, read_unpaired,
                        unpair)

U, A = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
MU, MA = Message("user", "Hi"), Message("assistant", "Hello.")


def row(value):
  return Row("d.jsonl:3", value)


@pytest.mark.parametrize("value,record", [
    ({"messages": [{"role": "system", "content": "Be brief."}, U, A]},
     Chat((Message("system", "Be brief."), MU, MA))),
    ({"messages": [U, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]},
                   {"role": "tool", "content": "42", "tool_call_id": "1"}, A], "tools": '[{"name": "f"}]',
      "chat_template_kwargs": {"enable_thinking": False}},
     Chat((MU, Message("assistant", None, {"tool_calls": [{"function": {"name": "f"}}]}),
           Message("tool", "42", {"tool_call_id": "1"}), MA), tools=({"name": "f"},),
          template_kwargs={"enable_thinking": False})),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                        {"from": "function_call", "value": '{"name": "f", "arguments": {"x": 1}}'},
                        {"from": "observation", "value": "42"}, {"from": "gpt", "value": "Hello."}]},
     Chat((Message("system", "S"), MU,
           Message("assistant", "", {"tool_calls": [{"type": "function",
                                                     "function": {"name": "f", "arguments": {"x": 1}}}]}),
           Message("tool", "42"), MA))),
    ({"prompt": [U], "completion": [A]}, Chat((MU, MA), prompt_turns=1)),
    ({"prompt": "p", "completion": "c"}, Prompted("p", "c")),
    ({"input": "p", "target": "c"}, Prompted("p", "c")),
    ({"instruction": "i", "input": "x", "output": "c"}, Prompted("i\nx", "c")),
    ({"instruction": "i", "input": "", "output": "c"}, Prompted("i", "c")),
    ({"text": "plain"}, Prompted("", "plain")),
])
def test_sft_record_shapes(value, record):
  assert parse_sft(row(value)) == record


@pytest.mark.parametrize("value,match", [
    ("[1, 2]", r"expected a JSON object, got str"),
    ({"question": "q"}, r"no known fields \(have \['question'\]\); use messages, conversations, prompt/completion"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"},
     r"no known fields .*; this is a preference record \(train it with a preference objective\)"),
    ({"prompt": "p", "completion": 3}, r"completion must be a string, got int"),
    ({"prompt": "p", "completion": ""}, r"empty completion"),
    ({"messages": []}, r"messages must be a non-empty list of messages, got an empty list"),
    ({"messages": [U]}, r"messages has no assistant message \(roles: user\); supervised training needs at least one"),
    ({"messages": [{"role": "human", "content": "Hi"}, A]}, r"messages\[0\] has role 'human'; use one of system, "
                                                              r"user, assistant, tool"),
    ({"messages": [{"content": "Hi"}, A]}, r"messages\[0\] has no role"),
    ({"messages": [{"role": "user"}, A]}, r"messages\[0\] \(user\) has no content"),
    ({"messages": [U, {"role": "assistant", "content": [{"type": "image"}]}]},
     r"messages\[1\].content\[0\] is a 'image' part; only text parts"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\] is from 'bot'; ShareGPT roles are "),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "f(1)"}]},
     r"conversations\[1\] \(function_call\) must hold the JSON of \{name, arguments\}"),
    ({"prompt": [U], "completion": [U]}, r"completion has no assistant message"),
    ({"messages": [U, A], "tools": "not json"}, r"tools is a string but not valid JSON"),
    ({"messages": [U, A], "chat_template_kwargs": [1]}, r"chat_template_kwargs must be an object, got list"),
])
def test_bad_sft_records_name_the_line_and_the_fix(value, match):
  with pytest.raises(DataError, match=rf"^d.jsonl:3: {match}.*; fix the record or pass --skip-bad-lines$"):
    parse_sft(row(value))


def test_preference_shapes_and_implicit_prompts():
  assert parse_preference(row({"prompt": "Q", "chosen": " a", "rejected": " b"})) == Preference("Q", " a", " b")
  # Standard: the common prefix, a space before the difference going to the answers (as TRL).
  assert parse_preference(row({"chosen": "The sky is blue.", "rejected": "The sky is green."})) == Preference(
      "The sky is", " blue.", " green.")
  # Conversational: the common messages; a string prompt beside them is ignored (TRL's maybe_extract_prompt).
  b = {"role": "assistant", "content": "Bye."}
  conv = parse_preference(row({"prompt": "Hi", "chosen": [U, A], "rejected": [U, b]}))
  assert conv == Preference((MU,), (MA,), (Message("assistant", "Bye."),))
  assert parse_preference(row({"prompt": [U], "chosen": [A], "rejected": [b]})) == conv
  # One answer extends the other: the last common element stays in both answers (neither is empty).
  assert extract_prompt((MU, MA), (MU, MA, MU, MA)) == ((MU,), (MA,), (MA, MU, MA))
  assert extract_prompt("abc", "abcd") == ("ab", "c", "cd")


@pytest.mark.parametrize("value,match", [
    ({"prompt": "Q", "chosen": " a"}, r"missing field 'rejected' \(have \['chosen', 'prompt'\]\)"),
    ({"prompt": "Q", "chosen": " a", "rejected": " a"}, r"chosen equals rejected; a preference pair needs two "
                                                        r"different answers"),
    ({"chosen": [U, A], "rejected": [U, A]}, r"chosen equals rejected"),
    ({"chosen": [U, A], "rejected": "x"}, r"chosen and rejected must both be strings or both be message lists"),
    ({"prompt": [U], "chosen": "a", "rejected": "b"}, r"prompt is a message list but chosen and rejected are strings"),
    ({"chosen": [U, A], "rejected": [{"role": "user", "content": "Yo"}, A]},
     r"chosen and rejected differ from their first message, so they hold no common prompt; give the prompt"),
    ({"prompt": [U], "chosen": [U, A], "rejected": [A]}, r"chosen must start with an assistant message after the "
                                                         r"prompt, found role 'user'"),
])
def test_bad_preference_records(value, match):
  with pytest.raises(DataError, match=rf"^d.jsonl:3: {match}.*; fix the record or pass --skip-bad-lines$"):
    parse_preference(row(value))


def test_unpaired_records():
  assert parse_unpaired(row({"prompt": "Q", "completion": " a", "label": False})) == Unpaired("Q", " a", False)
  assert parse_unpaired(row({"prompt": [U], "completion": [A], "label": True})) == Unpaired((MU,), (MA,), True)
  for value, match in [({"prompt": "Q", "completion": " a"}, r"missing field 'label'"),
                       ({"prompt": "Q", "completion": " a", "label": 1}, r"label must be true or false, got 1"),
                       ({"prompt": [U], "completion": " a", "label": True}, r"prompt and completion must both be"),
                       ({"prompt": [U], "completion": [U], "label": True}, r"completion must start with an "
                                                                          r"assistant message")]:
    with pytest.raises(DataError, match=rf"^d.jsonl:3: {match}"):
      parse_unpaired(row(value))


def test_unpair_keeps_pairs_together():
  pairs = [Example("d.jsonl:1", Preference("Q", " a", " b")), Example("d.jsonl:2", Unpaired("R", " c", False))]
  assert unpair(pairs) == [Example("d.jsonl:1 (chosen)", Unpaired("Q", " a", True)),
                           Example("d.jsonl:1 (rejected)", Unpaired("Q", " b", False)),
                           Example("d.jsonl:2", Unpaired("R", " c", False))]


def test_reading_skips_and_counts_bad_records(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join([json.dumps({"prompt": "p", "completion": "c"}), "{bad",
                             json.dumps({"prompt": "p", "completion": ""}), json.dumps({"text": "t"})]) + "\n")
  with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
    read_sft(str(path))
  examples, skipped = read_sft(str(path), skip_bad=True)
  assert [(e.where.rsplit("/", 1)[1], e.record) for e in examples] == [
      ("d.jsonl:1", Prompted("p", "c")), ("d.jsonl:4", Prompted("", "t"))]
  assert [s.rsplit("/", 1)[1] for s in skipped] == [
      "d.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes, column 2)",
      "d.jsonl:3: empty completion"]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "p", "completion": ""}) + "\n")
  with pytest.raises(DataError, match=r"--data .*bad.jsonl: no usable records: all 1 are malformed \(the first: "
                                      r".*bad.jsonl:1: empty completion\); fix them"):
    read_sft(str(bad), skip_bad=True)


def test_reading_preference_and_unpaired_data(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text("\n".join([json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}),
                             json.dumps({"prompt": "R", "completion": " c", "label": False})]) + "\n")
  with pytest.raises(DataError, match=r"p.jsonl:2: missing field 'chosen'"):
    read_preference(str(path))
  assert [e.record for e in read_preference(str(path), skip_bad=True)[0]] == [Preference("Q", " a", " b")]
  examples, _ = read_unpaired(str(path))
  assert [(e.where.rsplit("/", 1)[1], e.record) for e in examples] == [
      ("p.jsonl:1 (chosen)", Unpaired("Q", " a", True)), ("p.jsonl:1 (rejected)", Unpaired("Q", " b", False)),
      ("p.jsonl:2", Unpaired("R", " c", False))]
