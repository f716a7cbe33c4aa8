"""Many adapters on one base: banks served per example, composition, LoRAHub.

* ``stack`` / ``put`` / ``remove`` / ``slots`` / ``unstack``: a *bank* of
  adapters (``jlora.Bank`` variant) served in one batch with
  ``jlora.wrap(f)(bank, x, adapter_ids=ids)``, with fixed-capacity slots
  that are filled and emptied without recompiling.
* ``load`` / ``load_bank``: jlora or PEFT adapter directories into a tree or a bank.
* ``compose``: one adapter from several (PEFT's ``add_weighted_adapter``
  methods, exact where PEFT is not).
* ``lorahub``: the weights of a composition fitted on a few examples.

Example:
  >>> import jlora.multi
  >>> "stack" in jlora.multi.__all__
  True
"""

from jlora.multi._bank import put
from jlora.multi._bank import remove
from jlora.multi._bank import slots
from jlora.multi._bank import stack
from jlora.multi._bank import unstack
from jlora.multi._compose import ComposeInfo
from jlora.multi._compose import compose
from jlora.multi._io import load
from jlora.multi._io import load_bank
from jlora.multi._io import put_directory
from jlora.multi._lorahub import LoraHubResult
from jlora.multi._lorahub import lorahub
from jlora.multi._search import CMAES
from jlora.multi._search import OnePlusOneES
from jlora.multi._variant import Bank

__all__ = [
    "Bank",
    "CMAES",
    "ComposeInfo",
    "LoraHubResult",
    "OnePlusOneES",
    "compose",
    "load",
    "load_bank",
    "lorahub",
    "put",
    "put_directory",
    "remove",
    "slots",
    "stack",
    "unstack",
]
