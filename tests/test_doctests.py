"""Every docstring example in the installed package runs and gives what it shows.

A module's examples are its shortest documentation; this keeps them true. Modules that
run a program on import (``__main__``) and the project templates (files ``fedsync new``
copies, not modules of this package) are left out, and so is the PyTorch adapter: torch is
not in ``[all]`` (README), and tests/test_adapters_torch.py runs its examples (20 of them),
skipping where torch is not installed and failing in CI, which installs it. Without this the
README's test command failed on a fresh machine (``No module named 'torch'``).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import fedsync
import fedsync.broker_config
import fedsync.coordinator
import fedsync.device_agent

# The services' folders install under fedsync by package-dir (pyproject.toml), which an
# editable install's path walk does not see: each is walked from its own package.
PACKAGES = (fedsync, fedsync.broker_config, fedsync.coordinator, fedsync.device_agent)
ELSEWHERE = {"fedsync.adapters.torch"}  # needs torch; its examples run in tests/test_adapters_torch.py


def _modules() -> list[str]:
    names = {p.__name__ for p in PACKAGES[1:]}
    for package in PACKAGES:
        names.update(m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."))
    return sorted(n for n in names if not n.endswith("__main__") and ".templates" not in n and n not in ELSEWHERE)


def test_every_docstring_example_in_the_package_passes() -> None:
    failed, attempted = [], 0
    for name in _modules():
        result = doctest.testmod(importlib.import_module(name), report=False)
        attempted += result.attempted
        if result.failed:
            failed.append((name, result.failed, result.attempted))
    assert failed == []
    assert attempted >= 300  # the positive control: the walk did reach the examples (342 in 99 modules now)


def test_the_walk_reaches_every_layer() -> None:
    names = set(_modules())
    for expected in ("fedsync.coordinator.core", "fedsync.device_agent.agent", "fedsync.broker_config.render",
                     "fedsync.transport.mqtt", "fedsync.lab.demo", "fedsync.cli.coordinator", "fedsync.codecs"):
        assert expected in names
