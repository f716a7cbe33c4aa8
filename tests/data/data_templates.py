"""Four chat templates in the style of real ones, and their twins tagged with {% generation %}.

Each twin renders exactly the text of its template and tags what the model generates in
an assistant turn, through the end-of-turn token, as TRL's training templates do: the
answer (with its reasoning and tool calls) and the end of turn, never the header, and
never an empty reasoning block (jlora does not train those).

* LLAMA31: Llama 3.1: BOS, a system header with the dates (the system message slotted in),
  ``<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>``, single tool calls as
  JSON, tool results under the ``ipython`` role.
* QWEN3: Qwen3 ChatML with ``<think>``: reasoning from ``reasoning_content`` (or split out
  of the content), shown only for turns after the last user query, the last turn always
  with a think block (empty when it has no reasoning); ``enable_thinking=False`` puts an
  empty think block in the generation prompt; tool calls in ``<tool_call>``, tool results
  as user turns in ``<tool_response>``.
* GEMMA3: Gemma 3: BOS, ``<start_of_turn>user ... <end_of_turn>``, the ``model`` role, the
  system message folded into the first user turn, alternation enforced.
* SHAREGPT: ``Human:`` / ``Assistant:`` turns, the answer ended by the EOS token.
"""

LLAMA31_HEAD = r"""{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions.\n\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if 'tool_calls' in message %}
        {%- if not message.tool_calls | length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
"""

LLAMA31_CALL = r"""{{- '{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}' }}{{- '<|eot_id|>' }}"""

LLAMA31_MID = r"""
    {%- elif message.role == 'tool' or message.role == 'ipython' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- elif message.role == 'assistant' %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
"""

LLAMA31_ANSWER = r"""{{- message['content'] | trim + '<|eot_id|>' }}"""

LLAMA31_TAIL = r"""
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"""


def _tag(body: str) -> str:
  return "{%- generation %}" + body + "{%- endgeneration %}"


LLAMA31 = LLAMA31_HEAD + LLAMA31_CALL + LLAMA31_MID + LLAMA31_ANSWER + LLAMA31_TAIL
LLAMA31_TAGGED = LLAMA31_HEAD + _tag(LLAMA31_CALL) + LLAMA31_MID + _tag(LLAMA31_ANSWER) + LLAMA31_TAIL

QWEN3_HEAD = r"""{%- macro tool_calls(message, content) %}
    {%- if message.tool_calls %}
        {%- for tool_call in message.tool_calls %}
            {%- if (loop.first and content) or (not loop.first) %}{{- '\n' }}{%- endif %}
            {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
"""

QWEN3_THINK = r"""{{- '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}{{- tool_calls(message, content) }}{{- '<|im_end|>\n' }}"""
QWEN3_EMPTY_THINK = r"""{{- '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' }}"""
QWEN3_AFTER_EMPTY = r"""{{- content.lstrip('\n') }}{{- tool_calls(message, content) }}{{- '<|im_end|>\n' }}"""
QWEN3_PLAIN = r"""{{- content }}{{- tool_calls(message, content) }}{{- '<|im_end|>\n' }}"""

QWEN3_TAIL = r"""
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""

QWEN3 = (QWEN3_HEAD + QWEN3_THINK + "{%- else %}" + QWEN3_PLAIN + "{%- endif %}" + QWEN3_TAIL)
QWEN3_TAGGED = (QWEN3_HEAD + "{%- if reasoning_content.strip() %}" + _tag(QWEN3_THINK) + "{%- else %}"
                + QWEN3_EMPTY_THINK + _tag(QWEN3_AFTER_EMPTY) + "{%- endif %}{%- else %}" + _tag(QWEN3_PLAIN)
                + "{%- endif %}" + QWEN3_TAIL)

GEMMA3_HEAD = r"""{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set first_user_prefix = (messages[0]['content'] if messages[0]['content'] is string else messages[0]['content'][0]['text']) + '\n\n' %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set first_user_prefix = "" %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- macro text(content) %}
    {%- if content is string %}{{- content | trim }}
    {%- elif content is iterable %}{%- for item in content %}{%- if item['type'] == 'text' %}{{- item['text'] | trim }}{%- endif %}{%- endfor %}
    {%- else %}{{- raise_exception("Invalid content type") }}
    {%- endif %}
{%- endmacro %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}
        {{- '<start_of_turn>model\n' }}
"""
GEMMA3_ANSWER = r"""{{- text(message['content']) }}{{- '<end_of_turn>\n' }}"""
GEMMA3_TAIL = r"""
    {%- else %}
        {{- '<start_of_turn>' + message['role'] + '\n' + (first_user_prefix if loop.first else "") }}
        {{- text(message['content']) }}{{- '<end_of_turn>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"""

GEMMA3 = GEMMA3_HEAD + GEMMA3_ANSWER + GEMMA3_TAIL
GEMMA3_TAGGED = GEMMA3_HEAD + _tag(GEMMA3_ANSWER) + GEMMA3_TAIL

SHAREGPT_HEAD = r"""{%- if messages[0].role == 'system' %}
    {{- messages[0].content + '\n\n' }}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message.role == 'user' %}
        {{- 'Human: ' + message.content + '\n\n' }}
    {%- elif message.role == 'assistant' %}
        {{- 'Assistant:' }}"""
SHAREGPT_ANSWER = r"""{{- ' ' + message.content + eos_token + '\n\n' }}"""
SHAREGPT_TAIL = r"""
    {%- else %}
        {{- raise_exception('Unsupported role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"""

SHAREGPT = SHAREGPT_HEAD + SHAREGPT_ANSWER + SHAREGPT_TAIL
SHAREGPT_TAGGED = SHAREGPT_HEAD + _tag(SHAREGPT_ANSWER) + SHAREGPT_TAIL

TEMPLATES = {  # name: (template, tagged twin)
    "llama31": (LLAMA31, LLAMA31_TAGGED),
    "qwen3": (QWEN3, QWEN3_TAGGED),
    "gemma3": (GEMMA3, GEMMA3_TAGGED),
    "sharegpt": (SHAREGPT, SHAREGPT_TAGGED),
}

# Special tokens of the four templates, added to the bundled byte-level tokenizer for the tests.
SPECIAL_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>",
                  "<start_of_turn>", "<end_of_turn>"]
ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]  # Qwen3's, not special
