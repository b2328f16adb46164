"""ONNX Runtime scoring under Loopline's model input/output contract, one batched ``run`` per call.

Inputs. A model with ONE input gets a float tensor ``[N, k]`` of the spec's numeric and bool
features in spec order (bool -> 0/1; string features are not part of it). A model with several
inputs gets one tensor per feature, by name (string features as string tensors), shaped
``[N]`` or ``[N, 1]`` as the model declares. A missing optional numeric feature is replaced by
its fill value (the reference data's mean, stored with the version) so NaN never reaches the
model; a missing optional string becomes ``""``.

Outputs. Classifiers as skl2onnx exports them: a label tensor plus probabilities, either a
``[N, C]`` float tensor (zipmap disabled) or a sequence of maps (zipmap); class names come from
the graph (``classlabels_*``), else the spec's classes. Regressors: one float output.
"""

from __future__ import annotations

import operator
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from loopline.errors import ModelError
from loopline.spec import PipelineSpec

_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64}
_NUMERIC_TYPES = {**_FLOAT_TYPES, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                  "tensor(bool)": np.bool_}


@dataclass
class ScoreResult:
    """One variant's outputs for a batch: predicted labels, values and per-class scores."""

    labels: list[str] | None
    values: list[float] | None
    scores: list[dict[str, float]] | None
    raw_scores: np.ndarray | None = None  # [N] of values, for NaN checks and profiles
    float32: bool = False  # the model computed its values in float32 (they round by batch make-up)


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """Session options for the hot path: few threads (the
    broker needs the other core), full optimisation."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def graph_class_labels(model: bytes) -> list[str] | None:
    """Class names stored in the graph by skl2onnx (``classlabels_*`` attributes), if any."""
    try:
        import onnx  # only needed at load time
    except ImportError:
        return None
    try:
        proto = onnx.load_model_from_string(model)
    except Exception:  # noqa: BLE001 - ORT reports unreadable models with a better message
        return None
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.name in ("classlabels_ints", "classlabels_int64s") and attr.ints:
                return [str(v) for v in attr.ints]
            if attr.name == "classlabels_strings" and attr.strings:
                return [v.decode() for v in attr.strings]
    return None


def tabular_features(spec: PipelineSpec) -> list[str]:
    """The features of the single-tensor contract: numeric and bool ones, in spec order."""
    return [f.name for f in spec.features if f.type != "string"]


class Scorer:
    """A loaded, validated model for one pipeline: ``score(features) -> ScoreResult``."""

    def __init__(self, model: bytes, spec: PipelineSpec,
                 fill_values: Mapping[str, float] | None = None,
                 intra_op_threads: int = 1, label: str = "model",
                 input_features: Sequence[str] | None = None) -> None:
        self.spec = spec
        self.label = label
        try:
            self.session = ort.InferenceSession(model,
                                                sess_options=session_options(intra_op_threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise ModelError(
                f"{label}: ONNX Runtime cannot load the model: {e} (rule: loads)") from e
        self.fill = dict(fill_values or {})
        self._types = {f.name: f.type for f in spec.features}
        self._optional = {f.name for f in spec.features if not f.required}
        # A version keeps the columns it was validated with, even after the spec gains features.
        self._input_features = list(input_features or [])
        self._check_inputs()
        self._check_outputs(model)

    # ---- inputs -------------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        inputs = self.session.get_inputs()
        self.single = len(inputs) == 1
        if self.single:
            i = inputs[0]
            self.columns = self._input_features or tabular_features(self.spec)
            if i.type not in _FLOAT_TYPES:
                raise ModelError(f"{self.label}: input {i.name!r} is {i.type}; a single-input "
                                 "model takes tensor(float) or tensor(double) (rule: input_type)")
            if len(i.shape) != 2:
                raise ModelError(f"{self.label}: input {i.name!r} has shape {i.shape}; expected "
                                 f"[N, {len(self.columns)}] (rule: input_shape)")
            width = i.shape[1]
            if not self.columns or (isinstance(width, int) and width != len(self.columns)):
                raise ModelError(
                    f"{self.label}: input {i.name!r} has shape {i.shape} but the pipeline has "
                    f"{len(self.columns)} numeric/bool feature(s) {self.columns}; expected [N, "
                    f"{len(self.columns)}] (rule: input_shape)")
            self._input_name = i.name
            self._dtype = _FLOAT_TYPES[i.type]
            self._getter = operator.itemgetter(*self.columns)
            fill = [self.fill.get(c, np.nan) for c in self.columns]
            self._fill_row = np.asarray(fill, dtype=self._dtype)
            self._optional_idx = [j for j, c in enumerate(self.columns) if c in self._optional]
            return
        self.columns = []
        self._inputs: list[tuple[str, Any, int]] = []
        for i in inputs:
            ftype = self._types.get(i.name)
            if ftype is None:
                raise ModelError(f"{self.label}: input {i.name!r} is not a feature of pipeline "
                                 f"{self.spec.name} (features: {sorted(self._types)}) (rule: "
                                 "input_name)")
            if ftype == "string":
                if i.type != "tensor(string)":
                    raise ModelError(f"{self.label}: input {i.name!r} is {i.type}; string feature "
                                     "needs tensor(string) (rule: input_type)")
                dtype: Any = object
            elif i.type in _NUMERIC_TYPES and not (ftype == "float" and i.type in ("tensor(int64)",
                                                                                   "tensor(int32)",
                                                                                   "tensor(bool)")):
                dtype = _NUMERIC_TYPES[i.type]
            else:
                raise ModelError(f"{self.label}: input {i.name!r} is {i.type}, which cannot hold "
                                 f"{ftype} feature values (rule: input_type)")
            rank = len(i.shape)
            if rank not in (1,
                            2) or (rank == 2 and isinstance(i.shape[1], int) and i.shape[1] != 1):
                raise ModelError(f"{self.label}: input {i.name!r} has shape {i.shape}; expected "
                                 "[N] or [N, 1] (rule: input_shape)")
            self._inputs.append((i.name, dtype, rank))
            self.columns.append(i.name)

    def feeds(self, features: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """The input tensors for a batch of feature records (one numpy array per input)."""
        if self.single:
            rows = list(map(self._getter, features))
            # numpy turns None into NaN and bools into 0/1 for float dtypes in one C loop.
            x = np.array(rows, dtype=self._dtype).reshape(len(features), len(self.columns))
            return {self._input_name: self._fill_missing(x)}
        out: dict[str, np.ndarray] = {}
        for name, dtype, rank in self._inputs:
            values = [f[name] for f in features]
            if name in self._optional:
                if dtype is object:
                    values = ["" if v is None else v for v in values]
                else:
                    fill = self.fill.get(name, 0.0)
                    values = [fill if v is None else v for v in values]
            arr = np.array(values, dtype=dtype)
            out[name] = arr.reshape(-1, 1) if rank == 2 else arr
        return out

    def feeds_columns(self, columns: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """The single input tensor from float64 feature columns (NaN = missing), equal to
        ``feeds``'s.

        Columnar callers (the lineage replay reads Arrow) skip building a dict per event. Python
        ints and bools reach float32 through a double in ``feeds`` too, so going through float64
        here gives bit-identical tensors.
        """
        if not self.single:
            raise ModelError(f"{self.label}: feeds_columns needs a single-input model (rule: "
                             "input_count)")
        x = np.empty((n, len(self.columns)), dtype=np.float64)
        for j, name in enumerate(self.columns):
            column = columns.get(name)
            if column is None:
                raise ModelError(f"{self.label}: input feature {name!r} is missing from the "
                                 f"columns {sorted(columns)} (rule: input_name)")
            x[:, j] = column
        return {self._input_name: self._fill_missing(x.astype(self._dtype, copy=False))}

    def _fill_missing(self, x: np.ndarray) -> np.ndarray:
        """Replace NaN in optional columns by their fill values, in place."""
        if self._optional_idx:
            sub = x[:, self._optional_idx]
            nan = np.isnan(sub)
            if nan.any():
                sub[nan] = np.broadcast_to(self._fill_row[self._optional_idx], sub.shape)[nan]
                x[:, self._optional_idx] = sub
        return x

    # ---- outputs ------------------------------------------------------------------------------
    def _check_outputs(self, model: bytes) -> None:
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs]
        self._label_idx: int | None = None
        self._prob_idx: int | None = None
        self._value_idx: int | None = None
        self._zipmap = False
        if self.spec.label.task == "regression":
            for j, o in enumerate(outputs):
                if o.type in _FLOAT_TYPES:
                    self._value_idx = j
                    break
            if self._value_idx is None:
                raise ModelError(f"{self.label}: a regression model needs a float output; outputs "
                                 f"are {[(o.name, o.type) for o in outputs]} (rule: output_type)")
            self.classes: list[str] = []
            return
        for j, o in enumerate(outputs):
            if o.type.startswith("seq(map(") and self._prob_idx is None:
                self._prob_idx, self._zipmap = j, True
            elif o.type in _FLOAT_TYPES and len(o.shape) == 2 and self._prob_idx is None:
                self._prob_idx = j
            elif o.type in ("tensor(int64)", "tensor(int32)",
                            "tensor(string)") and self._label_idx is None:
                self._label_idx = j
        if self._label_idx is None and self._prob_idx is None:
            raise ModelError(f"{self.label}: a classifier needs a label and/or probability output; "
                             f"outputs are {[(o.name, o.type) for o in outputs]} (rule: "
                             "output_type)")
        self.classes = graph_class_labels(model) or list(self.spec.label.classes or [])

    @property
    def input_signature(self) -> tuple[Any, ...]:
        """What this model's input tensors depend on: inputs (names, ONNX types, shapes), columns,
        fills.

        Two versions may share one batch's feeds only when their signatures are equal: a float32 and
        a float64 model over the same columns need different tensors, and so do two versions with
        different fill values for missing optional features.
        """
        inputs = tuple((i.name, i.type, tuple(str(d) for d in i.shape))
                       for i in self.session.get_inputs())
        return self.single, tuple(self.columns), inputs, tuple(sorted(self.fill.items()))

    def run(self, feeds: Mapping[str, np.ndarray],
            watchdog: RunWatchdog | None = None) -> list[Any]:
        """One ORT run over a batch (ended with an error if it outlasts the watchdog's timeout)."""
        if watchdog is None:
            result: list[Any] = self.session.run(None, dict(feeds))  # ORT is untyped
            return result
        return watchdog.run(self.session, dict(feeds))

    def score(self, features: Sequence[Mapping[str, Any]]) -> ScoreResult:
        """Score a batch of feature records with one ORT run."""
        return self.parse(self.run(self.feeds(features)), len(features))

    def parse(self, out: list[Any], n: int, with_scores: bool = True) -> ScoreResult:
        """Turn ORT outputs into labels, values and per-class
        scores (``with_scores=False``: no scores)."""
        if self._value_idx is not None:
            raw_values = np.asarray(out[self._value_idx])
            v = raw_values.astype(np.float64, copy=False).reshape(n, -1)[:, 0]
            return ScoreResult(None, v.tolist(), None, v, raw_values.dtype == np.float32)
        probs: np.ndarray | None = None
        classes = self.classes
        single = False
        if self._prob_idx is not None:
            raw = out[self._prob_idx]
            if self._zipmap:
                keys = list(raw[0].keys()) if raw else []
                probs = np.array([[d[k] for k in keys] for d in raw],
                                 dtype=np.float64).reshape(n, len(keys))
                classes = [str(k) for k in keys]
                single = True  # ZipMap's maps hold tensor(float) values
            else:
                single = np.asarray(raw).dtype == np.float32
                probs = np.asarray(raw, dtype=np.float64)
                if len(classes) != probs.shape[1]:
                    classes = [str(c) for c in range(probs.shape[1])]
        if self._label_idx is not None:
            lab = out[self._label_idx].reshape(n)
            labels = lab.tolist() if lab.dtype == object else lab.astype(str).tolist()
        else:
            assert probs is not None
            names = np.asarray(classes, dtype=object)
            labels = names[probs.argmax(axis=1)].tolist()
        if probs is None:
            return ScoreResult(labels, None, None, None)
        positive = self.spec.label.positive
        col = classes.index(positive) if positive in classes else probs.shape[1] - 1
        value = probs[:, col]
        # one dict per event is the costliest part; a replay only compares values
        if not with_scores:
            return ScoreResult(labels, value.tolist(), None, value, single)
        scores = [dict(zip(classes, row)) for row in probs.tolist()]
        return ScoreResult(labels, value.tolist(), scores, value, single)


class RunWatchdog:
    """Ends ONNX Runtime runs that take longer than ``timeout_s`` (``RunOptions.terminate``).

    One daemon thread checks the run in progress every ``tick_s``; a run that outlasts its
    deadline raises in the calling thread, so one hanging model cannot stall the service.
    """

    def __init__(self, timeout_s: float, tick_s: float = 0.05) -> None:
        self.timeout_s = timeout_s
        self.tick_s = tick_s
        self._lock = threading.Lock()
        self._current: tuple[ort.RunOptions, float] | None = None
        self._thread = threading.Thread(target=self._watch, name="ort-watchdog", daemon=True)
        self._thread.start()

    def run(self, session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[Any]:
        """``session.run`` under the deadline; raise :class:`ModelError` (rule: timeout) past it."""
        options = ort.RunOptions()
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            self._current = (options, deadline)
        try:
            result: list[Any] = session.run(None, feeds, options)  # ORT is untyped
            return result
        except Exception as e:
            if options.terminate:
                raise ModelError(f"scoring took longer than {self.timeout_s:g}s and was stopped "
                                 "(rule: timeout)") from e
            raise
        finally:
            with self._lock:
                self._current = None

    def _watch(self) -> None:
        while True:
            time.sleep(self.tick_s)
            with self._lock:
                current = self._current
            if current is not None and time.monotonic() > current[1]:
                current[0].terminate = True


def synthetic_batch(spec: PipelineSpec, n: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """A batch of valid feature records made from the spec's rules (warm-up and smoke tests)."""
    rng = np.random.default_rng(seed)
    records: list[dict[str, Any]] = [{} for _ in range(n)]
    for f in spec.features:
        if f.type in ("float", "int"):
            lo = f.min if f.min is not None else (f.max - 1.0 if f.max is not None else 0.0)
            hi = f.max if f.max is not None else lo + 1.0
            col = rng.uniform(lo, hi, n)
            # int(): a plain int whatever numpy's round gives.
            values: list[Any] = (
                [int(round(v)) for v in col]  # noqa: RUF046 - see above
                if f.type == "int" else col.tolist())
        elif f.type == "bool":
            values = [bool(i % 2) for i in range(n)]
        else:
            pool = f.values or ["a", "b"]
            values = [pool[i % len(pool)] for i in range(n)]
        for r, v in zip(records, values):
            r[f.name] = v
    return records
