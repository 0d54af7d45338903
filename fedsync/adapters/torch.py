"""PyTorch models as fedsync trainers: ``state_dict`` <-> parameters, and :class:`TorchTrainer`.

Theory of operation
-------------------
fedsync federates named float32 arrays; a PyTorch model keeps its state in
``model.state_dict()``. :func:`state_to_params` and :func:`params_to_state` map one to the
other, under the ``state_dict``'s own names (``conv1.weight``, ``bn1.running_mean``, ...):

- every floating-point tensor is federated: the parameters, and float buffers such as
  BatchNorm's ``running_mean`` and ``running_var``, which FedAvg then averages weighted by
  samples like any weight (a float16/bfloat16/float64 model is sent as float32 and cast
  back on load);
- a BatchNorm ``running_var`` entry that an aggregate made negative is set to 0 on load
  (:func:`clamp_running_variances`): a variance cannot be negative, and one that is makes
  every output NaN;
- integer buffers stay on the device: BatchNorm's ``num_batches_tracked`` is a step
  counter, not a weight (it only matters with ``momentum=None``) and the wire is float32;
- ``keep_local`` (a predicate on the name) keeps more tensors local, e.g. every
  BatchNorm tensor for FedBN (Li et al. 2021): ``keep_local=lambda n: ".bn" in n``. The
  coordinator's initial model must be built with the same predicate.

:class:`TorchTrainer` loads the global parameters into its model (on the CPU), trains one
round and returns the new state. Training is the user's ``train_one_round(model, loader,
hyper)`` (its return value, a dict of numbers or None, becomes the update's metrics) or
the default: plain SGD at ``hyper["lr"]`` for ``hyper["epochs"]`` passes, minimising the
loss plus FedProx's proximal term mu/2 ||w - w_global||^2 over the trainable parameters
(Li et al. 2020; ``hyper["mu"]``, 0 = FedAvg). :func:`proximal_term` gives a custom loop
the same term. Data is a ``torch.utils.data.DataLoader`` or an ``(x, y)`` pair of arrays
or tensors; a pair is cut into minibatches of ``hyper["batch_size"]`` in an order drawn
from the round's ``rng``, so a round replays exactly. torch's own generator (dropout, a
DataLoader's shuffle) is seeded from ``rng`` at every fit; it is process-wide, so
devices training at the same time in one process share it. ``threads`` calls
``torch.set_num_threads`` (also process-wide) before every fit and evaluation: 1 or 2 on a
Raspberry Pi leaves a core for the MQTT link.

Example (the shortest real use: a trainer factory for ``fedsync agent --trainer``)::

    import torch
    from fedsync.adapters.torch import TorchTrainer, state_to_params
    from fedsync.datasets import digits_federation

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)
        def forward(self, x):
            return self.fc(x)

    def initial_params():                      # fedsync coordinator --model mymodel:initial_params
        torch.manual_seed(0)
        return state_to_params(Net())

    def make_trainer(device_id, section):      # fedsync agent --trainer mymodel:make_trainer
        data = digits_federation(10, seed=0)[int(device_id.rsplit("-", 1)[-1])]
        return TorchTrainer(Net(), (data.x_train, data.y_train), (data.x_test, data.y_test), threads=1)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from fedsync.trainer_api import EvalResult, FitResult

__all__ = ["TorchTrainer", "federated_names", "params_to_state", "proximal_term", "state_to_params"]

EVAL_BATCH = 1024  # rows per forward pass when scoring


def federated_names(model: torch.nn.Module, keep_local: Callable[[str], bool] | None = None) -> list[str]:
    """The ``state_dict`` entries that are federated: floating point and not ``keep_local``.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    >>> federated_names(net)
    ['0.bias', '0.weight', '1.bias', '1.running_mean', '1.running_var', '1.weight']
    """
    return sorted(name for name, t in model.state_dict().items()
                  if t.is_floating_point() and not (keep_local and keep_local(name)))


def state_to_params(model: torch.nn.Module, keep_local: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """The model's federated state as float32 numpy arrays (copies), sorted by name.

    >>> params = state_to_params(torch.nn.Linear(4, 2))
    >>> {k: (v.shape, v.dtype) for k, v in params.items()}
    {'bias': ((2,), dtype('float32')), 'weight': ((2, 4), dtype('float32'))}
    """
    state = model.state_dict()
    return {name: state[name].detach().to("cpu", torch.float32).numpy().copy()
            for name in federated_names(model, keep_local)}


def params_to_state(model: torch.nn.Module, params: Mapping[str, np.ndarray],
                    keep_local: Callable[[str], bool] | None = None) -> None:
    """Copy ``params`` into the model's tensors in place (cast to each tensor's dtype).
    A missing, extra or differently shaped parameter raises ``ValueError`` naming it.

    >>> net = torch.nn.Linear(2, 1)
    >>> params_to_state(net, {"weight": np.ones((1, 2), np.float32), "bias": np.zeros(1, np.float32)})
    >>> net(torch.ones(1, 2)).item()
    2.0
    """
    names = federated_names(model, keep_local)
    state = model.state_dict()
    for name in sorted(set(names) | set(params)):
        if name not in params:
            raise ValueError(f"parameter {name!r} of the model is missing")
        if name not in names:
            raise ValueError(f"parameter {name!r} is not a federated tensor of the model")
        if tuple(np.shape(params[name])) != tuple(state[name].shape):
            raise ValueError(f"parameter {name!r} has shape {tuple(np.shape(params[name]))}, "
                             f"the model's is {tuple(state[name].shape)}")
    with torch.no_grad():
        for name in names:
            state[name].copy_(torch.from_numpy(np.asarray(params[name], np.float32)))
        clamp_running_variances(model)


def clamp_running_variances(model: torch.nn.Module) -> int:
    """Set every negative BatchNorm ``running_var`` entry to 0; return how many there were.

    A variance cannot be negative, but an aggregate of deltas can make one so: with top-k
    and error feedback an entry moves only in the rounds its accumulated residual wins a
    slot, then by the whole backlog at once (docs/benchmarks.md, real data). A negative
    entry makes evaluation divide by the square root of a negative number (NaN outputs);
    at 0 it divides by ``sqrt(eps)``, and the next round's batch statistics move it on.

    >>> bn = torch.nn.BatchNorm1d(3)
    >>> bn.running_var.copy_(torch.tensor([1.0, -0.5, -0.1]))
    tensor([ 1.0000, -0.5000, -0.1000])
    >>> clamp_running_variances(bn), bn.running_var.tolist()
    (2, [1.0, 0.0, 0.0])
    """
    fixed = 0
    with torch.no_grad():
        for module in model.modules():
            var = getattr(module, "running_var", None)  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
            if isinstance(var, torch.Tensor) and var.is_floating_point():
                negative = var < 0
                fixed += int(negative.sum())
                var[negative] = 0.0
    return fixed


def proximal_term(model: torch.nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's mu/2 * ||w - w_global||^2 over the trainable parameters named in ``anchor``;
    add it to the loss of a custom ``train_one_round``.

    >>> net = torch.nn.Linear(1, 1, bias=False)
    >>> anchor = {"weight": net.weight.detach() - 2}
    >>> proximal_term(net, anchor, mu=0.5).item()
    1.0
    """
    terms = [((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters()
             if p.requires_grad and name in anchor]
    if not terms or mu == 0:
        return torch.zeros(())
    return 0.5 * mu * torch.stack(terms).sum()


def _as_tensors(pair) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = pair
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, np.float32))
    y = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y, np.int64))
    return x, y


class TorchTrainer:
    """A :class:`~fedsync.trainer_api.Trainer` around one PyTorch model and one device's data.

    ``train`` and ``test`` are DataLoaders or ``(x, y)`` pairs; ``loss_fn`` defaults to
    cross-entropy (classification; ``accuracy`` is top-1). Reports ``train_loss`` (mean over
    the last pass) and ``steps`` for the default loop.

    >>> from fedsync.datasets import digits_federation
    >>> d = digits_federation(num_devices=1, seed=0)[0]
    >>> torch.manual_seed(0) and None
    >>> trainer = TorchTrainer(torch.nn.Linear(64, 10), (d.x_train, d.y_train), (d.x_test, d.y_test), threads=1)
    >>> start = state_to_params(trainer.model)
    >>> result = trainer.fit(start, {"lr": 0.5, "epochs": 5, "batch_size": 32}, np.random.default_rng(0))
    >>> result.num_samples == d.num_train, trainer.evaluate(result.params).accuracy > 0.9
    (True, True)
    """

    def __init__(self, model: torch.nn.Module, train, test, *, train_one_round: Callable | None = None,
                 loss_fn: Callable | None = None, threads: int | None = None,
                 keep_local: Callable[[str], bool] | None = None) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.model = model.to("cpu")
        self.train, self.test = train, test
        self.train_one_round = train_one_round
        self.loss_fn = loss_fn or torch.nn.functional.cross_entropy
        self.threads = threads
        self.keep_local = keep_local

    @property
    def num_train(self) -> int:
        if isinstance(self.train, tuple):
            return int(len(self.train[1]))
        return int(len(self.train.dataset))

    def _prepare(self, params) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        params_to_state(self.model, params, self.keep_local)

    def _batches(self, hyper, rng: np.random.Generator):
        """The training loader: the user's DataLoader, or seeded minibatches of the pair."""
        if not isinstance(self.train, tuple):
            return self.train
        x, y = _as_tensors(self.train)
        size = int(hyper.get("batch_size", len(y)))
        if size < 1:
            raise ValueError(f"hyper-parameter 'batch_size' must be >= 1, got {size}")
        order = torch.from_numpy(rng.permutation(len(y)))
        return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(y), size)]

    def fit(self, params, hyper, rng) -> FitResult:
        lr, epochs, mu = float(hyper.get("lr", 0.01)), int(hyper.get("epochs", 1)), float(hyper.get("mu", 0.0))
        if not (np.isfinite(lr) and lr > 0) or epochs < 1 or not (np.isfinite(mu) and mu >= 0):
            raise ValueError(f"hyper-parameters need lr > 0, epochs >= 1, mu >= 0; got lr={lr}, epochs={epochs}, mu={mu}")
        self._prepare(params)
        torch.manual_seed(int(rng.integers(2**63 - 1)))
        self.model.train()
        if self.train_one_round is not None:
            metrics = self.train_one_round(self.model, self._batches(hyper, rng), dict(hyper)) or {}
        else:
            metrics = self._default_round(lr, epochs, mu, hyper, rng)
        return FitResult(state_to_params(self.model, self.keep_local), num_samples=self.num_train,
                         metrics={k: float(v) for k, v in metrics.items()})

    def _default_round(self, lr: float, epochs: int, mu: float, hyper, rng) -> dict[str, float]:
        anchor = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        optimiser = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        steps, total, seen = 0, 0.0, 0
        for _ in range(epochs):
            total, seen = 0.0, 0
            for xb, yb in self._batches(hyper, rng):
                optimiser.zero_grad(set_to_none=True)
                loss = self.loss_fn(self.model(xb), yb)
                objective = loss + proximal_term(self.model, anchor, mu) if mu else loss
                objective.backward()
                optimiser.step()
                steps += 1
                total += float(loss.detach()) * len(yb)
                seen += len(yb)
        return {"train_loss": total / max(1, seen), "steps": float(steps)}

    def evaluate(self, params) -> EvalResult:
        self._prepare(params)
        self.model.eval()
        if isinstance(self.test, tuple):
            x, y = _as_tensors(self.test)
            batches = [(x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH]) for i in range(0, len(y), EVAL_BATCH)]
        else:
            batches = self.test
        loss, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for xb, yb in batches:
                out = self.model(xb)
                loss += float(self.loss_fn(out, yb, reduction="sum"))
                correct += int((out.argmax(dim=1) == yb).sum())
                count += len(yb)
        return EvalResult(loss=loss / max(1, count), accuracy=correct / max(1, count), num_samples=count)
