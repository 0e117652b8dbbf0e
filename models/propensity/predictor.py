"""The decision-time predictor: every product's booster scored in one LightGBM call.

At decision time all boosters are merged into one LightGBM model in the multiclass
layout (tree ``i * K + k`` belongs to product ``k``), so one call of LightGBM's
single-row fast path scores every product; its raw scores are bit-identical to the
per-product boosters' (the same trees summed in the same order).

The fast path calls LightGBM's C library through :mod:`models.propensity.native`
(without importing the ``lightgbm`` package); should the library lack the single-row
functions, :class:`FastPredictor` falls back to its matrix prediction on the same merged
model.
"""

from __future__ import annotations

import ctypes
import re
import threading
import weakref
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from models.propensity.native import (
    C_API_DTYPE_FLOAT32,
    C_API_PREDICT_CONTRIB,
    C_API_PREDICT_RAW_SCORE,
    NativeBooster,
    NativeError,
    check,
    library,
)

__all__ = ["FastPredictor"]


class FastPredictor:
    """All boosters merged into one multiclass-layout model, scored one row per call.

    LightGBM's single-row fast C API (``LGBM_BoosterPredictForMatSingleRowFast``) on the
    merged model returns every product's raw score in one call; products with fewer
    trees are padded with one-leaf trees of value 0, which leaves the sums unchanged.
    """

    def __init__(self, model_texts: Sequence[str | None], n_features: int) -> None:
        texts = [t for t in model_texts if t is not None]
        self.n_models = len(texts)
        self.n_features = n_features
        self.n_trees = 0
        self._lock = threading.Lock()
        self.booster: NativeBooster | None = None
        if not texts:
            return
        merged, self.n_trees = _merge_models(texts)
        self.booster = NativeBooster(merged)
        self._predict: Any = None
        try:
            self._init_fast_path(n_features)
        except (AttributeError, NativeError):
            # A library without the single-row functions: the matrix prediction on the
            # same merged model gives the same scores, only slower.
            self._predict = None

    def _init_fast_path(self, n_features: int) -> None:
        self._handle, self._predict = self._fast_handle(C_API_PREDICT_RAW_SCORE, n_features)
        self._contrib_handle, self._contrib = self._fast_handle(C_API_PREDICT_CONTRIB, n_features)

    def _fast_handle(self, predict_type: int, n_features: int) -> tuple[ctypes.c_void_p, Any]:
        assert self.booster is not None
        lib = library()
        handle = ctypes.c_void_p()
        check(
            lib.LGBM_BoosterPredictForMatSingleRowFastInit(
                self.booster.handle,
                ctypes.c_int(predict_type),
                ctypes.c_int(0),
                ctypes.c_int(-1),
                ctypes.c_int(C_API_DTYPE_FLOAT32),
                ctypes.c_int32(n_features),
                ctypes.c_char_p(b"num_threads=1"),
                ctypes.byref(handle),
            )
        )
        # Free the fast config before the booster it points to goes.
        weakref.finalize(self, _free_fast_config, lib.LGBM_FastConfigFree, handle, self.booster)
        prototype = ctypes.CFUNCTYPE(
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_int64),
            ctypes.c_void_p,
        )
        return handle, prototype(("LGBM_BoosterPredictForMatSingleRowFast", lib))

    def predict(self, row: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Raw scores (log-odds) of every model for one float32 feature row."""
        out = np.empty(self.n_models, dtype=np.float64)
        if self.booster is None:
            return out
        row = np.ascontiguousarray(row, dtype=np.float32)
        if self._predict is None:
            return self.booster.predict(row[None, :]).reshape(-1)
        self._call(self._predict, self._handle, row, out)
        return out

    def contributions(self, row: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """SHAP values of every model for one row: ``(n_models, n_features + 1)``, the
        last column the model's expected raw score (TreeSHAP, as ``pred_contrib``)."""
        width = self.n_features + 1
        out = np.zeros(self.n_models * width, dtype=np.float64)
        if self.booster is None:
            return out.reshape(self.n_models, width)
        row = np.ascontiguousarray(row, dtype=np.float32)
        if self._predict is None:
            values = self.booster.predict(row[None, :], predict_type=C_API_PREDICT_CONTRIB)
            return values.reshape(self.n_models, width)
        self._call(self._contrib, self._contrib_handle, row, out)
        return out.reshape(self.n_models, width)

    def _call(
        self,
        function: Any,
        handle: ctypes.c_void_p,
        row: npt.NDArray[np.float32],
        out: npt.NDArray[np.float64],
    ) -> None:
        length = ctypes.c_int64()
        with self._lock:
            code = function(handle, row.ctypes.data, ctypes.byref(length), out.ctypes.data)
        check(code)


def _free_fast_config(free: Any, handle: ctypes.c_void_p, booster: NativeBooster) -> None:
    free(handle)


_EMPTY_TREE: Final[str] = (
    "num_leaves=1\nnum_cat=0\nsplit_feature=\nsplit_gain=\nthreshold=\ndecision_type=\n"
    "left_child=\nright_child=\nleaf_value=0\nleaf_weight=\nleaf_count=\ninternal_value=\n"
    "internal_weight=\ninternal_count=\nis_linear=0\nshrinkage=1"
)


def _merge_models(texts: Sequence[str]) -> tuple[str, int]:
    """One LightGBM text model with ``num_tree_per_iteration = len(texts)``."""
    trees = [_trees_of(text) for text in texts]
    k = len(texts)
    iterations = max(len(t) for t in trees)
    header = texts[0][: texts[0].index("tree_sizes=")]
    lines = []
    for line in header.splitlines():
        if line.startswith("num_class="):
            line = f"num_class={k}"
        elif line.startswith("num_tree_per_iteration="):
            line = f"num_tree_per_iteration={k}"
        elif line.startswith("objective="):
            line = f"objective=multiclass num_class:{k}"
        lines.append(line)
    parts = ["\n".join(lines), "\n\n"]
    n = 0
    real = 0
    for i in range(iterations):
        for j in range(k):
            tree = trees[j][i] if i < len(trees[j]) else _EMPTY_TREE
            real += i < len(trees[j])
            parts.append(f"Tree={n}\n{tree}\n\n\n")
            n += 1
    parts.append("end of trees\n\nparameters:\nend of parameters\n\npandas_categorical:null\n")
    return "".join(parts), real


def _trees_of(text: str) -> list[str]:
    """The tree blocks of a LightGBM text model, without their ``Tree=i`` lines."""
    body = text[text.index("Tree=0\n") : text.index("end of trees")]
    return [tree.strip("\n") for tree in re.split(r"(?m)^Tree=\d+\n", body)[1:]]
