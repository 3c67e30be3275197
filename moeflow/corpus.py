"""Text that ships with Python itself, so calibration and evaluation need no download.

- calibration: docstrings of the standard library's modules and of their public classes and
  functions (API documentation prose and examples);
- evaluation: `pydoc_data.topics`, the Language Reference sections `help()` shows — a different
  source, never used for calibration.
Both are deterministic for a given Python version. `--text builtin:NAME` selects one."""

from __future__ import annotations

import importlib
import inspect
import pydoc
import sys
import warnings
from pathlib import Path

from .errors import ConfigError

# GUI, self-test and side-effect modules: importing them is slow, noisy or prints
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "test"}


def _module_docs(name: str) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except Exception:  # modules missing on this platform (winreg, ...) simply contribute nothing
        return []
    docs = [pydoc.getdoc(mod)]
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(pydoc.getdoc(obj))
    return [d for d in docs if len(d) > 40]


def calibration_text() -> str:
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _SKIP)
    return "\n\n".join(d for n in names for d in _module_docs(n))


def evaluation_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


BUILTIN = {"calibration": calibration_text, "evaluation": evaluation_text}


def read_text(spec: str) -> str:
    """A file path, or builtin:calibration / builtin:evaluation."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise ConfigError(f"unknown built-in text {name!r} (builtin:calibration, builtin:evaluation)")
        return BUILTIN[name]()
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"text file not found: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise ConfigError(f"{path} is not a UTF-8 text file ({e.__class__.__name__})") from None
    if not text.strip():
        raise ConfigError(f"text file is empty: {path}")
    return text
