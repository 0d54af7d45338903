"""The imports and ``python -m`` modules that README.md and docs/*.md show exist.

The layering move (issue 11) left README's ``from fedsync.mqtt import Credentials`` and
docs/chaos.md's ``python -m fedsync.chaos`` pointing at modules that were gone; a reader
copying them got ``ModuleNotFoundError``. Every ``from fedsync... import ...`` line, every
``import fedsync...`` line and every ``python -m fedsync...`` in those files is resolved
here. The PyTorch adapter needs torch, which is not in ``[all]``: it is resolved where torch
is installed (CI installs it) and left out elsewhere.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FROM = re.compile(r"^\s*from (fedsync[\w.]*) import ([\w, ()]+)", re.M)
IMPORT = re.compile(r"^\s*import (fedsync[\w.]*)", re.M)
RUN = re.compile(r"python3? -m (fedsync[\w.]*)")
NEEDS_TORCH = "fedsync.adapters.torch"


def _references() -> list[tuple[str, str, str | None]]:
    """(file, module, attribute or None) for every reference in the docs."""
    refs = []
    for path in DOCS:
        text = path.read_text()
        for module, names in FROM.findall(text):
            for name in re.split(r"[,\s()]+", names):
                if name:
                    refs.append((path.name, module, name))
        refs += [(path.name, m, None) for m in IMPORT.findall(text) + RUN.findall(text)]
    return refs


def test_every_module_and_name_the_docs_import_exists() -> None:
    torch_here = bool(os.environ.get("CI")) or importlib.util.find_spec("torch") is not None
    refs = [r for r in _references() if torch_here or r[1] != NEEDS_TORCH]
    missing = []
    for doc, module, name in refs:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing.append((doc, module, name, str(exc)))
            continue
        if name is not None and not hasattr(mod, name):
            missing.append((doc, module, name, "no such attribute"))
    assert missing == []
    assert len(refs) >= 10  # the positive control: the patterns did find the docs' imports


def test_the_patterns_see_a_stale_import() -> None:
    text = "```python\nfrom fedsync.mqtt import Credentials\n```\npython -m fedsync.chaos --listen x\n"
    assert FROM.findall(text) == [("fedsync.mqtt", "Credentials")]
    assert RUN.findall(text) == ["fedsync.chaos"]
    assert importlib.util.find_spec("fedsync.mqtt") is None  # what the README named before this test
