"""The layers import only downwards; sans-IO cores import no I/O at all.

The rule, bottom to top (a module may import its own layer and any below it):

    contract   fedsync.{topics,messages,params,codecs,errors,actions,signing,config,log,address,
               models,synthetic,cborview,trainer_api,executor,transitions}
    transport  fedsync.transport
    services   fedsync.device_agent, fedsync.broker_config      (independent of each other)
    coordinator fedsync.coordinator  (imports the device agent only in edge.py: an edge
               coordinator is a device of its upstream)
    lab        fedsync.lab
    cli        fedsync.cli

This reads the source with ``ast`` (every import, also those inside functions), so it needs
no import side effects and sees lazy imports too. No module imports a private name
(``_x``) from another package, and none imports the old top-level names
(``coordinator``, ``device_agent``, ``broker_config``) that the install no longer has.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"fedsync": ROOT / "fedsync", "fedsync.coordinator": ROOT / "coordinator",
           "fedsync.device_agent": ROOT / "device_agent", "fedsync.broker_config": ROOT / "broker_config"}
RANK = {"contract": 0, "transport": 1, "device_agent": 2, "broker_config": 2, "coordinator": 3, "lab": 4, "cli": 5}
# The sans-IO cores: state machines fed with messages and times, returning actions.
CORES = ["fedsync.coordinator.core", "fedsync.coordinator.assembler", "fedsync.coordinator.aggregate",
         "fedsync.coordinator.strategies", "fedsync.coordinator.server_opt", "fedsync.coordinator.central_dp",
         "fedsync.coordinator.model_store", "fedsync.coordinator.round_state", "fedsync.coordinator.policy",
         "fedsync.coordinator.events", "fedsync.coordinator.presence", "fedsync.coordinator.model_publication",
         "fedsync.coordinator.broker_watch", "fedsync.coordinator.retained_audit", "fedsync.coordinator.upload_gaps",
         "fedsync.coordinator.receipts", "fedsync.device_agent.agent", "fedsync.device_agent.agent_state",
         "fedsync.device_agent.agent_actions", "fedsync.device_agent.model_fetch", "fedsync.device_agent.identity",
         "fedsync.executor",
         "fedsync.transitions", "fedsync.receipts"]
IO_MODULES = {"threading", "tempfile", "socket", "paho", "time", "asyncio", "subprocess", "concurrent"}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "fedsync" and parts[:1] in (["coordinator"], ["device_agent"], ["broker_config"]):
                continue
            out[name] = path
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "fedsync" or len(parts) == 1:
        return "contract"
    return parts[1] if parts[1] in RANK else "contract"


def imports(path: pathlib.Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")[: -node.level] if not path.name == "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from fedsync.coordinator import demo` imports a module: count it as that module
            found.append((base, names, node.lineno))
    return found


MODULES = modules()


def test_the_module_graph_is_read() -> None:
    # positive control: the walk sees every layer and the known modules
    assert {layer(m) for m in MODULES} == set(RANK)
    assert "fedsync.coordinator.core" in MODULES and "fedsync.cli" in MODULES and "fedsync.lab.demo" in MODULES
    assert len(MODULES) >= 55


def violations() -> list[str]:
    bad = []
    for module, path in sorted(MODULES.items()):
        mine = layer(module)
        for target, names, line in imports(path, module):
            top = target.split(".")[0]
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
            if top in ("coordinator", "device_agent", "broker_config"):
                bad.append(f"{where} imports the old top-level name {target}")
                continue
            if top != "fedsync":
                continue
            theirs = layer(target)
            if RANK[theirs] > RANK[mine] or (mine != theirs and RANK[theirs] == RANK[mine]):
                bad.append(f"{where}: {mine} module {module} imports {theirs} module {target}")
            elif mine == "coordinator" and theirs == "device_agent" and module != "fedsync.coordinator.edge":
                bad.append(f"{where}: {module} imports the device agent {target} (only edge.py may)")
            if theirs != mine and any(n.startswith("_") and n != "__version__" for n in names):
                bad.append(f"{where}: {module} imports private {names} from {target}")
    return bad


def test_no_layer_imports_a_higher_one() -> None:
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch) -> None:
    # positive control: a contract module that imports the coordinator is reported
    fake = tmp_path / "bad.py"
    fake.write_text("from fedsync.coordinator.core import CoordinatorCore\nfrom fedsync.cli import _x\n")
    monkeypatch.setitem(MODULES, "fedsync.bad", fake)
    bad = [line for line in violations() if "bad.py" in line]
    assert len(bad) == 3, bad
    assert "contract module fedsync.bad imports coordinator module fedsync.coordinator.core" in bad[0]
    assert "contract module fedsync.bad imports cli module fedsync.cli" in bad[1]
    assert "imports private ['_x'] from fedsync.cli" in bad[2]


@pytest.mark.parametrize("module", CORES)
def test_sans_io_cores_import_no_io(module: str) -> None:
    path = MODULES[module]
    used = sorted({t.split(".")[0] for t, _n, _l in imports(path, module)} & IO_MODULES)
    assert used == [], f"{module} imports {used}"
