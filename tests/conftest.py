import os
import platform
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


# The vector extensions that change float rounding or a reference library's CPU kernels.
_VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                 "avx_vnni", "amx_bf16", "amx_tile", "asimd", "sve")


def cpu_description() -> str:
  """``"<model name>, <n> cores, <vector extensions>"`` from /proc/cpuinfo (Linux), else platform's."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
          model = value.strip()
        elif key in ("flags", "Features") and not flags:
          flags = set(value.split())
  except OSError:
    pass
  have = [f for f in _VECTOR_FLAGS if f in flags]
  return f"{model}, {os.cpu_count()} cores, {' '.join(have) or 'vector extensions unknown'}"


def pytest_sessionstart(session):
  """First line of the run, even with -q: the machine a run (its timings, or its failures) came from."""
  if hasattr(session.config, "workerinput"):
    return
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  if reporter is not None:
    reporter.write_line(f"cpu: {cpu_description()}")
