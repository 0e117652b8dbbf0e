"""LightGBM's C library for scoring, without the ``lightgbm`` package.

Importing ``lightgbm`` imports what its optional integrations need when they are
installed (scikit-learn and SciPy, pandas, PyArrow): about 2.5 s and 100 MiB of a
serving worker's private memory, for a worker that only loads text models and predicts.
Scoring needs a few functions of LightGBM's public C API (``c_api.h``), called here
through ``ctypes`` on the library the package ships. Training still uses the package.

A :class:`NativeBooster` gives the raw scores ``lightgbm.Booster.predict(...,
raw_score=True)`` gives on the same model text, bit for bit: the same library runs
the same trees.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import platform
import weakref
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["NativeBooster", "NativeError", "library"]

C_API_DTYPE_FLOAT32: Final[int] = 0
C_API_PREDICT_RAW_SCORE: Final[int] = 1
C_API_PREDICT_CONTRIB: Final[int] = 3
_ROW_MAJOR: Final[int] = 1


class NativeError(ValueError):
    """LightGBM's C library refused a call (a model text it cannot read, a matrix of
    the wrong width); the message is the library's."""


def _library_file() -> Path:
    """Where the ``lightgbm`` package keeps its library, found as its ``libpath``
    module finds it, without importing the package."""
    spec = importlib.util.find_spec("lightgbm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("LightGBM is not installed")
    package = Path(next(iter(spec.submodule_search_locations)))
    system = platform.system()
    name = {"Windows": "lib_lightgbm.dll", "Darwin": "lib_lightgbm.dylib"}.get(
        system, "lib_lightgbm.so"
    )
    places = [package.parent, package / "bin", package / "lib"]
    if system == "Windows":
        places += [package.parent / "Release", package.parent / "windows" / "x64" / "DLL"]
    for place in places:
        if (place / name).is_file():
            return place / name
    raise ImportError(f"LightGBM's library {name} is not in {', '.join(map(str, places))}")


@functools.cache
def library() -> Any:
    """The C library (loaded once; the same one ``lightgbm`` loads, if it is imported)."""
    lib = ctypes.cdll.LoadLibrary(str(_library_file()))
    lib.LGBM_GetLastError.restype = ctypes.c_char_p
    return lib


def check(code: int) -> None:
    """Raise :class:`NativeError` with the library's message if ``code`` is a failure."""
    if code != 0:
        raise NativeError(library().LGBM_GetLastError().decode("utf-8", errors="replace"))


def _free(free: Any, handle: ctypes.c_void_p) -> None:
    free(handle)


class NativeBooster:
    """A LightGBM model loaded from its text, for prediction only."""

    def __init__(self, model_str: str) -> None:
        lib = library()
        self.handle = ctypes.c_void_p()
        iterations = ctypes.c_int(0)
        check(
            lib.LGBM_BoosterLoadModelFromString(
                ctypes.c_char_p(model_str.encode()),
                ctypes.byref(iterations),
                ctypes.byref(self.handle),
            )
        )
        weakref.finalize(self, _free, lib.LGBM_BoosterFree, self.handle)
        features, per_iteration = ctypes.c_int(0), ctypes.c_int(0)
        check(lib.LGBM_BoosterGetNumFeature(self.handle, ctypes.byref(features)))
        check(lib.LGBM_BoosterNumModelPerIteration(self.handle, ctypes.byref(per_iteration)))
        self.num_features = features.value
        self.per_iteration = per_iteration.value

    def feature_importance(self, importance_type: str = "split") -> npt.NDArray[Any]:
        """Each feature's ``"split"`` count (int32) or total ``"gain"`` (float64) over
        every tree, as ``lightgbm.Booster.feature_importance`` gives them."""
        kinds = {"split": 0, "gain": 1}
        if importance_type not in kinds:
            raise NativeError(f"importance_type must be 'split' or 'gain', not {importance_type!r}")
        out = np.zeros(self.num_features, dtype=np.float64)
        check(
            library().LGBM_BoosterFeatureImportance(
                self.handle,
                ctypes.c_int(0),
                ctypes.c_int(kinds[importance_type]),
                out.ctypes.data_as(ctypes.c_void_p),
            )
        )
        return out.astype(np.int32) if importance_type == "split" else out

    def predict(
        self, rows: npt.NDArray[np.float32], *, predict_type: int = C_API_PREDICT_RAW_SCORE
    ) -> npt.NDArray[np.float64]:
        """Raw scores of a float32 matrix of ``num_features`` columns: one a row, or
        ``(rows, per_iteration)`` for a model of several (with ``C_API_PREDICT_CONTRIB``,
        each row's contributions and expected value, flat per row)."""
        matrix = np.ascontiguousarray(rows, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != self.num_features:
            raise NativeError(
                f"expected a matrix of {self.num_features} feature columns, got shape "
                f"{matrix.shape}"
            )
        width = self.per_iteration
        if predict_type == C_API_PREDICT_CONTRIB:
            width *= self.num_features + 1
        out = np.zeros(matrix.shape[0] * width, dtype=np.float64)
        length = ctypes.c_int64(0)
        if matrix.shape[0]:
            check(
                library().LGBM_BoosterPredictForMat(
                    self.handle,
                    matrix.ctypes.data_as(ctypes.c_void_p),
                    ctypes.c_int(C_API_DTYPE_FLOAT32),
                    ctypes.c_int32(matrix.shape[0]),
                    ctypes.c_int32(matrix.shape[1]),
                    ctypes.c_int(_ROW_MAJOR),
                    ctypes.c_int(predict_type),
                    ctypes.c_int(0),
                    ctypes.c_int(-1),
                    ctypes.c_char_p(b""),
                    ctypes.byref(length),
                    out.ctypes.data_as(ctypes.c_void_p),
                )
            )
            if length.value != out.size:
                raise NativeError(f"LightGBM wrote {length.value} scores, expected {out.size}")
        if predict_type == C_API_PREDICT_RAW_SCORE and self.per_iteration == 1:
            return out
        return out.reshape(matrix.shape[0], width)
