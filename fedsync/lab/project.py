"""Your own model as a project folder: ``fedsync new DIR`` writes one, ``fedsync demo --project DIR`` runs it.

Theory of operation
-------------------
A project is a folder with ``trainer.py`` (the model, the data and four functions),
``coordinator.toml`` (``[model] init = "trainer:initial_params"``), ``agent.toml``
(``[trainer] factory = "trainer:make_trainer"`` plus the factory's own keys) and a
README. :func:`write_project` copies the templates of ``fedsync/templates/{framework}/``
(numpy, sklearn or pytorch), offline; it refuses a folder that holds anything. It also
writes ``secrets/``: the accounts the README's service commands log in with (``users.txt``
for ``fedsync broker --users``, one ``{name}.pw`` each, random, owner-only, git-ignored).

:func:`run_project_demo` runs the project the way the two services would, in one
process on loopback: it reads both TOML files, loads the initial model and the factory
through :mod:`fedsync.plugins` (modules are looked up in the project folder), starts a
broker, and federates ``--devices`` devices ``dev-0 .. dev-{N-1}`` (each trainer wrapped in
:class:`~fedsync.plugins.SpecCheckedTrainer`, as the agent does) with the coordinator's
round policy, hyper-parameters, strategy and codec. The federation has one device per
data slice, so target and min_devices are N and quorum is half, as in ``fedsync demo``.
Accuracy after each round comes from the project's ``global_accuracy(params, section)``
and the reference from ``centralised_accuracy(section)``; the summary has the keys of
``fedsync demo``'s.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from fedsync.errors import OperatorError

FRAMEWORKS = ("numpy", "sklearn", "pytorch")
PROJECT_FILES = ("trainer.py", "coordinator.toml", "agent.toml", "README.md")
# What each framework's trainer.py imports beyond the device core install.
NEEDS = {"numpy": None, "sklearn": ("sklearn", "fedsync[sklearn]"), "pytorch": ("torch", "torch==2.13.0 (CPU)")}


def write_project(directory: str | Path, framework: str, name: str | None = None) -> list[Path]:
    """Write a working project for ``framework`` into ``directory`` (created; must be empty).

    ``name`` (default: the folder's name) becomes the federation name in both TOML files.
    Returns the files written.

    >>> import tempfile, os
    >>> files = write_project(os.path.join(tempfile.mkdtemp(), "farm"), "numpy")
    >>> [f.name for f in files][:5], len(files)
    (['trainer.py', 'coordinator.toml', 'agent.toml', 'README.md', 'users.txt'], 18)
    """
    if framework not in FRAMEWORKS:
        raise OperatorError(f"--framework: {framework!r} is not one of {', '.join(FRAMEWORKS)}", code=2)
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise OperatorError(f"{target}: exists and is not an empty folder; fedsync new writes a new project", code=2)
    federation = _federation_name(name or target.resolve().name)
    templates = resources.files("fedsync") / "templates" / framework
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for filename in PROJECT_FILES:
        text = (templates / f"{filename}.tmpl").read_text()
        path = target / filename
        path.write_text(text.replace("@NAME@", federation).replace("@FRAMEWORK@", framework))
        written.append(path)
    return written + write_accounts(target / "secrets", ["coordinator", "monitor",
                                                         *(f"dev-{i}" for i in range(PROJECT_DEVICES))])


PROJECT_DEVICES = 10  # the templates' [trainer] devices and [round] min_devices


def write_accounts(folder: Path, names: list[str]) -> list[Path]:
    """The accounts the project README's services log in with: ``users.txt`` (``name:password``
    lines, for ``fedsync broker --users``) and one ``{name}.pw`` each (for ``--password-file``),
    random passwords, readable by the owner only; a ``.gitignore`` keeps them out of git."""
    import os
    import secrets

    folder.mkdir(mode=0o700)
    passwords = {name: secrets.token_urlsafe(18) for name in names}
    written = []

    def private(path: Path, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        written.append(path)

    private(folder / "users.txt", "".join(f"{n}:{pw}\n" for n, pw in passwords.items()))
    for name, pw in passwords.items():
        private(folder / f"{name}.pw", pw + "\n")
    private(folder / ".gitignore", "*\n")
    return written


def _federation_name(name: str) -> str:
    """A topic-safe federation name from a folder name (letters, digits, '-', '_')."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-") or "project"
    return cleaned[:64]


@dataclass(frozen=True, slots=True)
class ProjectDemoOptions:
    project: str
    devices: int | None = None  # default: [trainer] devices, else 10
    rounds: int | None = None  # default: coordinator.toml [round] rounds
    seed: int = 0
    broker_kind: str = "amqtt"
    update_codec: str | None = None  # default: coordinator.toml [round] update_codec
    json: bool = False
    plot: str | None = None
    timeout: float = 900.0


@dataclass(frozen=True, slots=True)
class LoadedProject:
    """What a project folder says, loaded and checked (every mistake is one OperatorError line)."""

    folder: Path
    coordinator: object  # CoordinatorConfig
    agent: object  # AgentConfig
    section: dict
    initial_params: dict
    factory: object
    global_accuracy: object
    centralised_accuracy: object


def load_project(folder: str | Path) -> LoadedProject:
    """Read ``coordinator.toml`` and ``agent.toml`` and load the model and the trainer factory."""
    from fedsync.config import load_config
    from fedsync.coordinator.config import CoordinatorConfig
    from fedsync.device_agent.config import AgentConfig
    from fedsync.plugins import PluginError, load_initial_model, load_object

    root = Path(folder)
    if not root.is_dir():
        raise OperatorError(f"--project: {root} is not a folder (make one with fedsync new {root})", code=2)
    paths = {name: root / name for name in ("coordinator.toml", "agent.toml")}
    for path in paths.values():
        if not path.is_file():
            raise OperatorError(f"--project: {path} is missing (fedsync new writes it)", code=2)
    coordinator = load_config(CoordinatorConfig, paths["coordinator.toml"], check_files=False)
    agent = load_config(AgentConfig, paths["agent.toml"], check_files=False)
    section = dict(agent.trainer)  # the factory gets the whole table, as the agent passes it
    spec = section.get("factory")
    if not isinstance(spec, str):
        raise OperatorError(f"{paths['agent.toml']}: [trainer] factory = \"module:function\" is required", code=2)
    if coordinator.model.init is None:
        raise OperatorError(f"{paths['coordinator.toml']}: [model] init is required for a project", code=2)
    init = coordinator.model.init
    if ":" not in init and not Path(init).is_absolute():
        init = str(root / init)  # a model file named in the project's own config sits beside it
    _forget_other_module(spec, root)
    try:
        params = load_initial_model(init, search_path=[root])
        factory = load_object(spec, "trainer", search_path=[root])
    except PluginError as err:
        raise OperatorError(str(err), code=2) from None
    module = sys.modules[factory.__module__]
    hooks = {}
    for hook in ("global_accuracy", "centralised_accuracy"):
        fn = getattr(module, hook, None)
        if not callable(fn):
            raise OperatorError(f"{module.__file__}: has no function {hook}(...); fedsync demo --project "
                                "needs global_accuracy(params, section) and centralised_accuracy(section)", code=2)
        hooks[hook] = fn
    return LoadedProject(root, coordinator, agent, section, params, factory, **hooks)


def _forget_other_module(spec: str, root: Path) -> None:
    """Another project's ``trainer`` imported earlier in this process must not stand in for this one's."""
    top = spec.partition(":")[0].split(".")[0]
    module = sys.modules.get(top)
    where = getattr(module, "__file__", None)
    if where is not None and (root / f"{top}.py").is_file() and Path(where).resolve() != (root / f"{top}.py").resolve():
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]


def run_project_demo(opts: ProjectDemoOptions) -> dict:
    """The project's federation on loopback; returns (and prints) ``fedsync demo``'s summary."""
    from rich.console import Console

    from fedsync.broker_config.process import BrokerProcess
    from fedsync.coordinator.config import screen_from, strategy_factory_from
    from fedsync.lab.demo import _plot, _print_summary
    from fedsync.lab.federation import LocalFederation, make_users
    from fedsync.plugins import SpecCheckedTrainer

    console = Console(stderr=True)
    p = load_project(opts.project)
    section = dict(p.section)
    devices = opts.devices if opts.devices is not None else int(section.get("devices", 10))
    if devices < 1:
        raise OperatorError(f"--devices: must be >= 1, got {devices}", code=2)
    section["devices"] = devices
    cfg = p.coordinator
    policy = replace(cfg.round, rounds=opts.rounds if opts.rounds is not None else cfg.round.rounds,
                     target=devices, min_devices=devices, quorum=max(1, (devices + 1) // 2),
                     update_codec=opts.update_codec or cfg.round.update_codec)
    num_params = sum(v.size for v in p.initial_params.values())

    def make_trainer(device_id: str, index: int):
        return SpecCheckedTrainer(p.factory(device_id, dict(section)))

    users = make_users(devices)
    broker = BrokerProcess(opts.broker_kind, users=users)
    started = time.perf_counter()
    with console.status(f"starting {opts.broker_kind} broker on 127.0.0.1"):
        broker.start()
    try:
        fed = LocalFederation(broker.url, users, n_devices=devices, seed=opts.seed, policy=policy,
                              screen=screen_from(cfg), hyper=dict(cfg.train), federation=cfg.federation.name,
                              strategy_factory=strategy_factory_from(cfg, num_params),
                              initial_params=p.initial_params, make_trainer=make_trainer,
                              score=lambda params: p.global_accuracy(params, dict(section)))
        summary = _federate(console, fed, policy.rounds, opts.timeout)
    finally:
        broker.stop()
    with console.status("training the centralised baseline"):
        central = float(p.centralised_accuracy(dict(section)))
    summary.update(mode=policy.mode, centralised_accuracy=central,
                   centralised_reference="the project's centralised_accuracy(section)", devices=devices, slow_devices=[],
                   broker=opts.broker_kind, project=str(p.folder), wall_seconds=round(time.perf_counter() - started, 3))
    if opts.plot:
        _plot(summary, opts.plot)
    _print_summary(summary, stderr=opts.json)
    if opts.json:
        print(json.dumps(summary))
    return summary


def _federate(console, fed, rounds: int, timeout: float) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=console)
    task = progress.add_task("rounds", total=rounds, last="")

    def on_round(rec) -> None:
        acc = f"acc={rec.accuracy:.3f}" if rec.accuracy is not None else rec.outcome
        progress.update(task, advance=1 if rec.outcome == "committed" else 0,
                        last=f"round {rec.round_id}: {rec.accepted} updates, {acc}")

    fed.on_round = on_round
    t0 = time.perf_counter()
    with progress:
        fed.start()
        try:
            finished = fed.wait(timeout)
            elapsed = time.perf_counter() - t0
            summary = fed.summary()  # before stop(): a clean shutdown is not a drop-out
        finally:
            fed.stop()
    summary.update(finished=finished, devices_killed=[], federation_seconds=round(elapsed, 3), reached_seconds=None)
    return summary
