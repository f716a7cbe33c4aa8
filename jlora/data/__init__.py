"""Training data for chat SFT and preference tuning, with assistant masks you can trust.

Three steps, each usable alone:

1. **Read** files into rows that remember their file and line: ``read_rows``
   (JSONL, JSON, Parquet, ``datasets`` ``save_to_disk`` directories, text; one
   file, several, or a directory).
2. **Parse** rows into records, checked: ``parse_sft`` (``Chat``: OpenAI
   ``messages`` or ShareGPT ``conversations``; ``Prompted``: prompt/completion,
   input/target, Alpaca, text), ``parse_preference`` (``Preference``, implicit
   prompt extracted), ``parse_unpaired`` (``Unpaired``, KTO). ``read_sft``,
   ``read_preference`` and ``read_unpaired`` read and parse, skipping bad
   records on request.
3. **Tokenize** into fixed-width arrays: ``tokenize_sft`` (conversations masked
   by rendering prefixes with the tokenizer's own chat template, checked to be
   exact; truncation or packing), ``tokenize_preference`` and
   ``tokenize_unpaired`` (as TRL 1.16's DPO and KTO trainers).

``show_example`` prints a row with its trained tokens marked; ``Batches`` cuts
deterministic batches. Every problem with the data is a ``DataError`` naming the
file and line (or index) and the fix.

Example:
  >>> import jlora.data
  >>> "tokenize_sft" in jlora.data.__all__
  True
"""

from jlora.data._batches import Batches
from jlora.data._chat import EMPTY_REASONING
from jlora.data._errors import DataError
from jlora.data._load import read_preference
from jlora.data._load import read_sft
from jlora.data._load import read_unpaired
from jlora.data._preference import PreferenceReport
from jlora.data._preference import TokenizedPreference
from jlora.data._preference import TokenizedUnpaired
from jlora.data._preference import tokenize_preference
from jlora.data._preference import tokenize_unpaired
from jlora.data._read import Row
from jlora.data._read import read_rows
from jlora.data._records import Chat
from jlora.data._records import Example
from jlora.data._records import Message
from jlora.data._records import Preference
from jlora.data._records import Prompted
from jlora.data._records import Unpaired
from jlora.data._records import extract_prompt
from jlora.data._records import parse_preference
from jlora.data._records import parse_sft
from jlora.data._records import parse_unpaired
from jlora.data._records import unpair
from jlora.data._sft import SFTReport
from jlora.data._sft import TokenizedSFT
from jlora.data._sft import chat_prompt_ids
from jlora.data._sft import encode_prompted
from jlora.data._sft import eval_prompt
from jlora.data._sft import tokenize_sft
from jlora.data._show import show_example

__all__ = [
    "Batches",
    "Chat",
    "DataError",
    "EMPTY_REASONING",
    "Example",
    "Message",
    "Preference",
    "PreferenceReport",
    "Prompted",
    "Row",
    "SFTReport",
    "TokenizedPreference",
    "TokenizedSFT",
    "TokenizedUnpaired",
    "Unpaired",
    "chat_prompt_ids",
    "encode_prompted",
    "eval_prompt",
    "extract_prompt",
    "parse_preference",
    "parse_sft",
    "parse_unpaired",
    "read_preference",
    "read_rows",
    "read_sft",
    "read_unpaired",
    "show_example",
    "tokenize_preference",
    "tokenize_sft",
    "tokenize_unpaired",
    "unpair",
]
