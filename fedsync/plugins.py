"""Plug-ins by import path, initial models from files, and the model-spec check.

Theory of operation
-------------------
An operator names code the way uvicorn and gunicorn do, ``package.module:attribute``:
``fedsync agent --trainer mytrainer:make_trainer`` and ``fedsync coordinator --model
mymodel:initial_params``. :func:`load_object` imports it and answers every mistake with
one :class:`PluginError` line that names the spec and the reason (module not found,
module failed to import, attribute missing, not callable).

An initial model is a ``dict[str, float32 ndarray]`` (the names are the model's, e.g. a
PyTorch ``state_dict``'s). :func:`load_initial_model` takes it from a ``module:function``,
a ``.npz`` or a ``.safetensors`` file. safetensors is read here, with no dependency: an
8-byte little-endian header length, a JSON header mapping each tensor to its dtype, shape
and ``data_offsets`` (relative to the end of the header), then the raw little-endian
bytes. As with every decoder of input we did not write, the header is checked against
the file size before anything is allocated, and offsets must lie inside the data.

The wire carries one flat float32 vector in the order of the manifest's ``param_spec``
(names sorted), so names, shapes and dtypes never cross it: the device is where a
trainer that returns another model must be caught, before it uploads something the
coordinator would average into the wrong places. :func:`check_spec` names the first
parameter that differs, and :class:`SpecCheckedTrainer` applies it to every fit.

Imports: the standard library, numpy and the contract's ``trainer_api`` only.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from fedsync.trainer_api import EvalResult, FitResult

__all__ = [
    "PluginError",
    "SpecCheckedTrainer",
    "SpecMismatch",
    "check_spec",
    "load_initial_model",
    "load_object",
    "read_npz",
    "read_safetensors",
    "validate_params",
    "write_safetensors",
]

# The round manifest's limits on param_spec (fedsync/messages.py): at most 256 named
# arrays, names of at most 128 characters, at most 8 dimensions. A model outside them
# could never be announced, so it is refused when it is loaded, naming the limit.
MAX_TENSORS = 256
MAX_NAME = 128
MAX_DIMS = 8
# safetensors' own limit on the JSON header (100 MB); a larger claim is a broken file.
MAX_HEADER = 100_000_000


class PluginError(ValueError):
    """A plug-in spec or model file that cannot be used; the message is one operator line.

    >>> str(PluginError("trainer", "x", "expected 'package.module:attribute'"))
    "trainer 'x': expected 'package.module:attribute'"
    """

    def __init__(self, what: str, spec: str, reason: str) -> None:
        self.what, self.spec, self.reason = what, spec, reason
        super().__init__(f"{what} {spec!r}: {reason}")


class SpecMismatch(ValueError):
    """A parameter dict that is not the model's: ``param`` names the first difference.

    >>> err = SpecMismatch("fc.bias", "missing", "parameter 'fc.bias' is missing")
    >>> err.param, err.reason
    ('fc.bias', 'missing')
    """

    def __init__(self, param: str, reason: str, message: str) -> None:
        self.param, self.reason = param, reason
        super().__init__(message)


def load_object(spec: str, what: str = "plug-in", search_path: Iterable[str | os.PathLike] = (".",)) -> object:
    """Import ``package.module:attribute`` (the attribute may be dotted) and return it.

    The directories in ``search_path`` are put on ``sys.path`` first (the current
    directory by default, as uvicorn's ``--app-dir`` does), so a project's own
    ``trainer.py`` is found when the ``fedsync`` script runs from elsewhere.
    The object must be callable (a factory, a function or a class).

    Example:
        >>> load_object("fedsync.models:build_model").__name__
        'build_model'
        >>> load_object("fedsync.models:no_such", what="trainer")
        Traceback (most recent call last):
        ...
        fedsync.plugins.PluginError: trainer 'fedsync.models:no_such': module 'fedsync.models' has no attribute 'no_such'
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".")) \
            or not all(p.isidentifier() for p in attr.split(".")):
        raise PluginError(what, spec, "expected 'package.module:attribute'")
    for directory in reversed(list(search_path)):  # the first directory ends up first on sys.path
        entry = os.path.abspath(directory)
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PluginError(what, spec, f"module {module_name!r} not found") from None
        raise PluginError(what, spec, f"module {module_name!r} failed to import: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised on import: one line, not a traceback
        raise PluginError(what, spec, f"module {module_name!r} failed to import: {type(exc).__name__}: {exc}") from None
    obj: object = module
    where = f"module {module_name!r}"
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            raise PluginError(what, spec, f"{where} has no attribute {part!r}")
        obj = getattr(obj, part)
        where = repr(f"{module_name}:{'.'.join(attr.split('.')[:i + 1])}")
    if not callable(obj):
        raise PluginError(what, spec, f"{attr!r} is not callable (it is a {type(obj).__name__})")
    return obj


def validate_params(params: object, what: str, spec: str) -> dict[str, np.ndarray]:
    """Check an initial model: a non-empty dict of named, finite float32 arrays within the
    manifest's limits. Returns it with C-contiguous arrays; raises :class:`PluginError`.

    >>> validate_params({"w": np.zeros(2)}, "model", "m:f")
    Traceback (most recent call last):
    ...
    fedsync.plugins.PluginError: model 'm:f': tensor 'w' is float64, expected float32
    """
    if not isinstance(params, Mapping):
        raise PluginError(what, spec, f"expected a dict of name -> float32 array, got {type(params).__name__}")
    if not params:
        raise PluginError(what, spec, "the model has no tensors")
    if len(params) > MAX_TENSORS:
        raise PluginError(what, spec, f"{len(params)} tensors, a round manifest holds at most {MAX_TENSORS}")
    out: dict[str, np.ndarray] = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise PluginError(what, spec, f"tensor name {name!r} must be text of 1-{MAX_NAME} characters")
        if not isinstance(value, np.ndarray):
            raise PluginError(what, spec, f"tensor {name!r} is a {type(value).__name__}, expected a numpy array")
        if value.dtype != np.float32:
            raise PluginError(what, spec, f"tensor {name!r} is {value.dtype}, expected float32")
        if value.ndim > MAX_DIMS:
            raise PluginError(what, spec, f"tensor {name!r} has {value.ndim} dimensions, at most {MAX_DIMS}")
        if not np.isfinite(value).all():
            raise PluginError(what, spec, f"tensor {name!r} has non-finite values")
        out[name] = np.array(value, dtype=np.float32, order="C", copy=not value.flags.c_contiguous)
    return out


def load_initial_model(spec: str, search_path: Iterable[str | os.PathLike] = (".",)) -> dict[str, np.ndarray]:
    """The initial global model from ``module:function`` (called with no arguments), a
    ``.npz`` or a ``.safetensors`` file of named float32 arrays.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "init.safetensors")
        >>> write_safetensors(path, {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)})
        >>> {k: v.shape for k, v in sorted(load_initial_model(path).items())}
        {'b': (3,), 'w': (2, 3)}
    """
    lowered = spec.lower()
    if lowered.endswith(".npz"):
        return validate_params(read_npz(spec), "model file", spec)
    if lowered.endswith(".safetensors"):
        return validate_params(read_safetensors(spec), "model file", spec)
    if ":" not in spec:
        raise PluginError("model", spec, "expected 'package.module:function', a .npz or a .safetensors file")
    fn = load_object(spec, "model", search_path)
    try:
        params = fn()  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - the user's function: one line naming it
        raise PluginError("model", spec, f"raised {type(exc).__name__}: {exc}") from None
    return validate_params(params, "model", spec)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Named arrays from a ``.npz`` (``numpy.savez``); pickled objects are refused."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except FileNotFoundError:
        raise PluginError("model file", str(path), "not found") from None
    except (OSError, ValueError) as exc:  # not a zip, a pickled object array, a truncated member
        raise PluginError("model file", str(path), f"not a readable .npz: {exc}") from None


# safetensors dtype names -> numpy (little-endian). Only F32 is accepted as a model; the
# rest are known so a refusal can say what the tensor is.
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": None, "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8"}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Named float32 arrays from a ``.safetensors`` file; any other dtype is refused, naming
    the tensor (convert with ``tensor.float()`` before saving).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> write_safetensors(path, {"w": np.arange(4, dtype=np.float32)})
    >>> read_safetensors(path)["w"].tolist()
    [0.0, 1.0, 2.0, 3.0]
    """
    spec = str(path)

    def bad(reason: str) -> PluginError:
        return PluginError("model file", spec, reason)

    try:
        blob = Path(path).read_bytes()
    except FileNotFoundError:
        raise bad("not found") from None
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror}") from None
    if len(blob) < 8:
        raise bad(f"not a safetensors file: {len(blob)} bytes, the header length alone is 8")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > min(MAX_HEADER, len(blob) - 8):  # before decoding a header the file cannot hold
        raise bad(f"not a safetensors file: header of {header_len} bytes in a file of {len(blob)}")
    try:
        header = json.loads(blob[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not a safetensors file: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("not a safetensors file: header is not a JSON object")
    data = memoryview(blob)[8 + header_len:]
    out: dict[str, np.ndarray] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: expected dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise bad(f"tensor {name!r}: unknown dtype {dtype!r}")
        if dtype != "F32":
            raise bad(f"tensor {name!r} is {dtype}, expected F32 (save float32 tensors, e.g. tensor.float())")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise bad(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= len(data):
            raise bad(f"tensor {name!r}: data_offsets [{begin}, {end}] outside the {len(data)} data bytes")
        if end - begin != 4 * math.prod(shape):
            raise bad(f"tensor {name!r}: {end - begin} bytes for shape {tuple(shape)} of F32")
        spans.append((begin, end, name))
        out[name] = np.frombuffer(data[begin:end], dtype="<f4").reshape(shape).astype(np.float32)
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise bad(f"tensors {a!r} and {b!r} overlap")
    return out


def write_safetensors(path: str | os.PathLike, params: Mapping[str, np.ndarray]) -> None:
    """Write named float32 arrays as ``.safetensors`` (names sorted, data 8-byte aligned)."""
    header: dict[str, object] = {}
    chunks, pos = [], 0
    for name in sorted(params):
        arr = np.array(params[name], dtype="<f4", order="C")  # ascontiguousarray would make a scalar 1-d
        raw = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the format pads the header with spaces to align the data
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


Spec = Sequence[tuple[str, Sequence[int]]]


def check_spec(expected: Spec, params: Mapping[str, np.ndarray], what: str = "parameter") -> None:
    """Raise :class:`SpecMismatch` naming the first (by name) parameter of ``params`` that is
    missing, extra, of another shape or not float32 against ``expected`` (a manifest's
    ``param_spec``: ``(name, shape)`` pairs; the wire's dtype is float32).

    Example:
        >>> check_spec([("b", (2,)), ("w", (3, 2))], {"b": np.zeros(2, np.float32), "w": np.zeros((2, 3), np.float32)})
        Traceback (most recent call last):
        ...
        fedsync.plugins.SpecMismatch: parameter 'w' has shape (2, 3), the model's is (3, 2)
    """
    want = {name: tuple(int(d) for d in shape) for name, shape in expected}
    for name in sorted(set(want) | set(params)):
        if name not in params:
            raise SpecMismatch(name, "missing", f"{what} {name!r} is missing ({len(want)} in the model, "
                                                f"{len(params)} given)")
        if name not in want:
            raise SpecMismatch(name, "extra", f"{what} {name!r} is not in the model")
        value = params[name]
        shape = tuple(np.shape(value))
        if shape != want[name]:
            raise SpecMismatch(name, "shape", f"{what} {name!r} has shape {shape}, the model's is {want[name]}")
        dtype = getattr(value, "dtype", type(value).__name__)
        if dtype != np.float32:
            raise SpecMismatch(name, "dtype", f"{what} {name!r} is {dtype}, the model's is float32")


class SpecCheckedTrainer:
    """Wraps a plug-in :class:`~fedsync.trainer_api.Trainer`: a fit whose parameters are not
    the global model's (names, shapes, float32) raises :class:`SpecMismatch` instead of
    being flattened into the wrong places. The agent logs the failed fit and uploads
    nothing for that round; the round closes on quorum or deadline as for a dead device.

    Example:
        >>> class Wrong:
        ...     def fit(self, params, hyper, rng):
        ...         return FitResult({"w": params["w"].astype(np.float64)}, 1, {})
        ...     def evaluate(self, params):
        ...         return EvalResult(0.0, 1.0, 1)
        >>> SpecCheckedTrainer(Wrong()).fit({"w": np.zeros(2, np.float32)}, {}, np.random.default_rng(0))
        Traceback (most recent call last):
        ...
        fedsync.plugins.SpecMismatch: trainer returned parameter 'w' is float64, the model's is float32
    """

    __slots__ = ("inner",)

    def __init__(self, inner) -> None:
        self.inner = inner

    def fit(self, params, hyper, rng) -> FitResult:
        result = self.inner.fit(params, hyper, rng)
        if not isinstance(result, FitResult):
            raise TypeError(f"trainer.fit returned {type(result).__name__}, expected fedsync.trainer_api.FitResult")
        expected = [(name, value.shape) for name, value in params.items()]
        check_spec(expected, result.params, "trainer returned parameter")
        return result

    def evaluate(self, params) -> EvalResult:
        return self.inner.evaluate(params)
