"""Plug-ins by import path, initial models from .npz/.safetensors, and the spec check."""

from __future__ import annotations

import doctest
import json
import struct
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

from fedsync import plugins
from fedsync.plugins import (PluginError, SpecCheckedTrainer, SpecMismatch, check_spec, load_initial_model,
                             load_object, read_safetensors, write_safetensors)
from fedsync.trainer_api import EvalResult, FitResult


def test_docstring_examples_run() -> None:
    result = doctest.testmod(plugins)
    assert (result.failed, result.attempted) == (0, 17)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project directory with a few modules, importable only through search_path."""
    (tmp_path / "good.py").write_text(textwrap.dedent("""
        import numpy as np
        VALUE = 3
        class Box:
            @staticmethod
            def make():
                return "made"
        def initial_params():
            return {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}
        def wrong_dtype():
            return {"w": np.ones(2)}
        def not_a_dict():
            return [1, 2]
        def raises():
            raise RuntimeError("no data dir")
        def nan():
            return {"w": np.array([np.nan], np.float32)}
    """))
    (tmp_path / "broken.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "crashes.py").write_text("raise ValueError('bad config')\n")
    yield tmp_path
    for name in ("good", "broken", "crashes"):
        sys.modules.pop(name, None)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])


def test_load_object_finds_a_project_module_on_the_search_path(project) -> None:
    assert load_object("good:Box.make", search_path=[project])() == "made"
    assert load_object("good:initial_params", search_path=[project])()["w"].shape == (2, 2)


@pytest.mark.parametrize("spec, message", [
    ("good", "trainer 'good': expected 'package.module:attribute'"),
    ("good:", "trainer 'good:': expected 'package.module:attribute'"),
    ("good:not-an-identifier", "trainer 'good:not-an-identifier': expected 'package.module:attribute'"),
    ("no_such_module_xyz:f", "trainer 'no_such_module_xyz:f': module 'no_such_module_xyz' not found"),
    ("good.sub:f", "trainer 'good.sub:f': module 'good.sub' not found"),
    ("broken:f", "trainer 'broken:f': module 'broken' failed to import: No module named 'no_such_dependency_xyz'"),
    ("crashes:f", "trainer 'crashes:f': module 'crashes' failed to import: ValueError: bad config"),
    ("good:missing", "trainer 'good:missing': module 'good' has no attribute 'missing'"),
    ("good:Box.gone", "trainer 'good:Box.gone': 'good:Box' has no attribute 'gone'"),
    ("good:VALUE", "trainer 'good:VALUE': 'VALUE' is not callable (it is a int)"),
])
def test_load_object_names_the_spec_and_the_reason(project, spec, message) -> None:
    with pytest.raises(PluginError) as err:
        load_object(spec, "trainer", search_path=[project])
    assert str(err.value) == message


def test_initial_model_from_a_function(project) -> None:
    params = load_initial_model("good:initial_params", search_path=[project])
    assert {k: (v.shape, v.dtype) for k, v in params.items()} == {"w": ((2, 2), np.float32), "b": ((2,), np.float32)}


@pytest.mark.parametrize("spec, message", [
    ("good:wrong_dtype", "model 'good:wrong_dtype': tensor 'w' is float64, expected float32"),
    ("good:not_a_dict", "model 'good:not_a_dict': expected a dict of name -> float32 array, got list"),
    ("good:raises", "model 'good:raises': raised RuntimeError: no data dir"),
    ("good:nan", "model 'good:nan': tensor 'w' has non-finite values"),
    ("init.pt", "model 'init.pt': expected 'package.module:function', a .npz or a .safetensors file"),
])
def test_initial_model_refusals(project, spec, message) -> None:
    with pytest.raises(PluginError) as err:
        load_initial_model(spec, search_path=[project])
    assert str(err.value) == message


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.standard_normal((8, 1, 3, 3)).astype(np.float32),
            "conv.bias": rng.standard_normal(8).astype(np.float32),
            "bn.running_var": np.ones(8, np.float32), "scalar": np.array(2.5, np.float32)}


def test_npz_round_trip(tmp_path) -> None:
    model = _model()
    np.savez(tmp_path / "init.npz", **model)
    loaded = load_initial_model(str(tmp_path / "init.npz"))
    assert sorted(loaded) == sorted(model)
    assert all(np.array_equal(loaded[k], model[k]) and loaded[k].dtype == np.float32 for k in model)


def test_safetensors_round_trip_and_files_written_by_the_safetensors_package(tmp_path) -> None:
    model = _model()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, model)
    save_file(model, str(theirs), metadata={"format": "np"})
    from safetensors.numpy import load_file

    for loaded in (load_initial_model(str(ours)), load_initial_model(str(theirs)), load_file(str(ours))):
        assert sorted(loaded) == sorted(model)
        assert all(np.array_equal(loaded[k], model[k]) for k in model)
        assert loaded["scalar"].shape == ()


def test_non_float32_tensors_are_refused_naming_the_tensor(tmp_path) -> None:
    save_file({"a": np.zeros(2, np.float32), "fc.weight": np.zeros((2, 2), np.float16)}, str(tmp_path / "h.safetensors"))
    np.savez(tmp_path / "d.npz", w=np.zeros(2, np.float32), steps=np.array(3, np.int64))
    with pytest.raises(PluginError) as err:
        load_initial_model(str(tmp_path / "h.safetensors"))
    assert str(err.value) == (f"model file '{tmp_path}/h.safetensors': tensor 'fc.weight' is F16, expected F32 "
                              f"(save float32 tensors, e.g. tensor.float())")
    with pytest.raises(PluginError) as err:
        load_initial_model(str(tmp_path / "d.npz"))
    assert str(err.value) == f"model file '{tmp_path}/d.npz': tensor 'steps' is int64, expected float32"


def _raw_safetensors(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


@pytest.mark.parametrize("blob, reason", [
    (b"\x01\x02", "not a safetensors file: 2 bytes, the header length alone is 8"),
    (_raw_safetensors({}, b"", header_len=1 << 40), "not a safetensors file: header of 1099511627776 bytes in a file of 10"),
    (struct.pack("<Q", 3) + b"{x}", "not a safetensors file: header is not JSON (Expecting property name enclosed "
                                    "in double quotes: line 1 column 2 (char 1))"),
    (_raw_safetensors([1], b""), "not a safetensors file: header is not a JSON object"),
    (_raw_safetensors({"w": {"dtype": "F32", "shape": [2]}}, b""), "tensor 'w': expected dtype, shape and data_offsets"),
    (_raw_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, bytes(8)),
     "tensor 'w': data_offsets [0, 16] outside the 8 data bytes"),
    (_raw_safetensors({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
     "tensor 'w': 8 bytes for shape (3,) of F32"),
    (_raw_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "v": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
     "tensors 'w' and 'v' overlap"),
    (_raw_safetensors({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     "tensor 'w': unknown dtype 'Q4'"),
    (_raw_safetensors({"w": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}, bytes(8)),
     "tensor 'w' is BF16, expected F32 (save float32 tensors, e.g. tensor.float())"),
])
def test_broken_safetensors_files_are_refused_before_allocating(tmp_path, blob, reason) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    with pytest.raises(PluginError) as err:
        read_safetensors(path)
    assert str(err.value) == f"model file '{path}': {reason}"


def test_a_missing_model_file_is_named(tmp_path) -> None:
    for name in ("none.npz", "none.safetensors"):
        with pytest.raises(PluginError) as err:
            load_initial_model(str(tmp_path / name))
        assert str(err.value) == f"model file '{tmp_path / name}': not found"


SPEC = [("b", (2,)), ("w", (3, 2))]


@pytest.mark.parametrize("params, param, reason, message", [
    ({"w": np.zeros((3, 2), np.float32)}, "b", "missing", "parameter 'b' is missing (2 in the model, 1 given)"),
    ({"a": np.zeros(1, np.float32), "b": np.zeros(2, np.float32), "w": np.zeros((3, 2), np.float32)},
     "a", "extra", "parameter 'a' is not in the model"),
    ({"b": np.zeros(2, np.float32), "w": np.zeros((2, 3), np.float32)},
     "w", "shape", "parameter 'w' has shape (2, 3), the model's is (3, 2)"),
    ({"b": np.zeros(2, np.float64), "w": np.zeros((3, 2), np.float32)},
     "b", "dtype", "parameter 'b' is float64, the model's is float32"),
])
def test_check_spec_names_the_first_difference(params, param, reason, message) -> None:
    with pytest.raises(SpecMismatch) as err:
        check_spec(SPEC, params)
    assert (err.value.param, err.value.reason, str(err.value)) == (param, reason, message)


def test_check_spec_accepts_the_model_itself() -> None:
    assert check_spec(SPEC, {"b": np.zeros(2, np.float32), "w": np.ones((3, 2), np.float32)}) is None


class _Renamer:
    """A trainer whose fit renames one parameter (a model built with another layer name)."""

    def __init__(self, rename: bool) -> None:
        self.rename = rename

    def fit(self, params, hyper, rng):
        out = {("w2" if self.rename and k == "w" else k): v + 1 for k, v in params.items()}
        return FitResult(out, 5, {})

    def evaluate(self, params):
        return EvalResult(0.5, 0.25, 5)


def test_spec_checked_trainer_refuses_a_renamed_parameter_and_passes_the_model() -> None:
    start = {"b": np.zeros(2, np.float32), "w": np.zeros((3, 2), np.float32)}
    ok = SpecCheckedTrainer(_Renamer(False)).fit(start, {}, np.random.default_rng(0))
    assert ok.num_samples == 5 and float(ok.params["w"].sum()) == 6.0
    with pytest.raises(SpecMismatch) as err:
        SpecCheckedTrainer(_Renamer(True)).fit(start, {}, np.random.default_rng(0))
    assert str(err.value) == "trainer returned parameter 'w' is missing (2 in the model, 2 given)"
    assert SpecCheckedTrainer(_Renamer(True)).evaluate(start) == EvalResult(0.5, 0.25, 5)
