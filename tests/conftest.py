import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_made_cache: str | None = None


def pytest_configure(config):
  """One persistent XLA compilation cache for the session: its processes and their subprocesses.

  Many tests run the same small programs (the fine-tuning command on the same short run, the
  same tiny models); the second compilation of an identical program is read from the cache.
  Set before JAX is imported (the xdist workers and the commands' subprocesses inherit the
  environment); an existing JAX_COMPILATION_CACHE_DIR is respected. Programs that compile in
  under 0.3 s are not worth a file.
  """
  global _made_cache
  if hasattr(config, "workerinput"):
    return
  if os.environ.get(_CACHE_ENV):
    return
  _made_cache = tempfile.mkdtemp(prefix="jlora-test-xla-cache-")
  os.environ[_CACHE_ENV] = _made_cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


def pytest_unconfigure(config):
  if _made_cache and not hasattr(config, "workerinput"):
    shutil.rmtree(_made_cache, ignore_errors=True)
