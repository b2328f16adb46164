"""Feature transforms of the batch learners: fitted on the training window, then applied by numpy
when training and by the same operations, in the same order and in double precision, inside the
exported ONNX graph, so the served model sees what the learner saw (a parity test holds it).

Whatever the spec's list order, the transforms apply as log -> bucketize -> one_hot ->
standardize -> polynomial. The result's columns are the numeric block (the numeric and bool inputs
that are not bucketized, after log and standardize), then the block's product terms
(polynomial), then the indicators (buckets, then string categories). An unknown category or a
missing string is all zeros. One-hot needs the strings themselves, so a map with ``strings``
makes the model take one input per feature (see ``loopline.scoring``); otherwise it takes the
single float tensor of the numeric and bool features in spec order.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from loopline.services.trainer.errors import TransformError
from loopline.spec import PipelineSpec, Transform

#: Most categories one string feature contributes when the spec declares no ``values``.
MAX_CATEGORIES = 50
#: Most product terms a polynomial transform may add (a wide window stays trainable in seconds).
MAX_TERMS = 2000


class Graph:
    """A small ONNX graph builder: nodes and constants with unique, prefixed names."""

    def __init__(self, prefix: str = "lp_") -> None:
        self.prefix = prefix
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def name(self, hint: str) -> str:
        """A fresh value name."""
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def const(self, value: Any, hint: str = "c", dtype: Any = None) -> str:
        """An initializer holding ``value``; return its name."""
        arr = np.asarray(value, dtype=dtype)
        n = self.name(hint)
        if arr.dtype.kind in "OUS":
            self.inits.append(
                helper.make_tensor(
                    n, TensorProto.STRING, arr.shape, [str(v).encode() for v in arr.ravel()]  # type: ignore[misc]  # onnx's stubs omit bytes
                )
            )
        else:
            self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        hint: str = "",
        out: str | None = None,
        domain: str = "",
        **attrs: Any,
    ) -> str:
        """Add a node with one output; return the output's name."""
        out = out or self.name(hint or op_type.lower())
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), [out], name=self.name(f"n_{op_type}"), domain=domain, **attrs
            )
        )
        return out


def ones_column(g: Graph, x: str) -> str:
    """A [N, 1] double column of ones with the batch size of the double matrix ``x``."""
    first = g.op("Gather", [x, g.const(np.array([0], dtype=np.int64), "col0")], "first", axis=1)
    zeros = g.op("Mul", [first, g.const(np.array([0.0]), "zero")], "zeros")
    return g.op("Add", [zeros, g.const(np.array([1.0]), "one")], "ones")


def _features_of(t: Transform, default: list[str]) -> list[str]:
    return list(t.features) if t.features else list(default)


@dataclass
class FeatureMap:
    """Fitted transforms of one batch learner (see the module docstring)."""

    numeric: list[str]
    strings: list[str] = field(default_factory=list)
    log: list[int] = field(default_factory=list)  # indices into ``numeric``
    buckets: dict[int, list[float]] = field(
        default_factory=dict
    )  # numeric index -> ascending edges
    categories: dict[str, list[str]] = field(default_factory=dict)
    keep: list[int] = field(default_factory=list)  # numeric indices that form the numeric block
    mean: list[float] = field(default_factory=list)  # per block column (0 when not standardized)
    inv_std: list[float] = field(default_factory=list)  # per block column (1 when not standardized)
    terms: list[tuple[int, ...]] = field(default_factory=list)  # block-column products, degree >= 2

    # ---- fitting ------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        spec: PipelineSpec,
        transforms: Sequence[Transform],
        x: np.ndarray,
        s: dict[str, list[str]] | None = None,
    ) -> FeatureMap:
        """Fit the transforms on a training matrix ``x`` ([N, k], numeric features, spec order)."""
        numeric = [f.name for f in spec.features if f.type != "string"]
        types = {f.name: f for f in spec.features}
        if x.shape[1] != len(numeric):
            raise TransformError(
                f"pipeline {spec.name}: expected {len(numeric)} numeric columns, got {x.shape[1]}"
            )
        by_kind: dict[str, list[Transform]] = {}
        for t in transforms:
            by_kind.setdefault(t.kind, []).append(t)
        fm = cls(numeric)
        fm.log = sorted(
            {numeric.index(n) for t in by_kind.get("log", []) for n in _features_of(t, [])}
        )
        work = fm._apply_log(x)
        for t in by_kind.get("bucketize", []):
            for n in _features_of(t, []):
                j = numeric.index(n)
                fm.buckets[j] = (
                    list(t.bounds)
                    if t.bounds is not None
                    else _quantile_edges(work[:, j], t.buckets)
                )
        for t in by_kind.get("one_hot", []):
            for n in _features_of(t, []):
                if n not in fm.strings:
                    fm.strings.append(n)
                    declared = types[n].values
                    fm.categories[n] = (
                        list(declared) if declared else _top_categories((s or {}).get(n, []))
                    )
        fm.strings.sort(key=[f.name for f in spec.features].index)
        fm.keep = [j for j in range(len(numeric)) if j not in fm.buckets]
        block = [numeric[j] for j in fm.keep]
        fm.mean, fm.inv_std = [0.0] * len(block), [1.0] * len(block)
        raw = work[:, fm.keep]
        for t in by_kind.get("standardize", []):
            for n in _features_of(t, block):
                if n not in block:
                    continue  # a bucketized feature is no longer in the numeric block
                c = block.index(n)
                col = raw[:, c]
                sd = float(col.std()) if col.size else 0.0
                fm.mean[c] = float(col.mean()) if col.size else 0.0
                # A constant column carries nothing: scaling it to 0 (like river) keeps it finite.
                fm.inv_std[c] = 1.0 / sd if sd > 0 else 0.0
        seen: set[tuple[int, ...]] = set()
        for t in by_kind.get("polynomial", []):
            cols = [block.index(n) for n in _features_of(t, block) if n in block]
            for degree in range(2, t.degree + 1):
                combos = (
                    itertools.combinations(cols, degree)
                    if t.interaction_only
                    else itertools.combinations_with_replacement(cols, degree)
                )
                for term in combos:
                    if term not in seen:
                        seen.add(term)
                        fm.terms.append(term)
        if len(fm.terms) > MAX_TERMS:
            raise TransformError(
                f"pipeline {spec.name}: polynomial transforms would add {len(fm.terms)} "
                f"terms, more than {MAX_TERMS} (rule: max_terms)"
            )
        return fm

    # ---- numpy --------------------------------------------------------------------------------
    @property
    def multi_input(self) -> bool:
        """Whether the model needs one input per feature (string features are one-hot encoded)."""
        return bool(self.strings)

    def columns(self) -> list[str]:
        """Names of the output columns, for scorecards and debugging."""
        block = [self.numeric[j] for j in self.keep]
        out = list(block) + ["*".join(block[c] for c in term) for term in self.terms]
        for j, edges in sorted(self.buckets.items()):
            out += [f"{self.numeric[j]}[bucket{b}]" for b in range(len(edges) + 1)]
        for n in self.strings:
            out += [f"{n}={c}" for c in self.categories[n]]
        return out

    def _apply_log(self, x: np.ndarray) -> np.ndarray:
        if not self.log:
            return x
        mask = np.zeros(x.shape[1], dtype=bool)
        mask[self.log] = True
        # np.log(1 + v), not log1p: the graph has no Log1p operator and must round the same way.
        return np.where(mask, np.log(np.maximum(x, 0.0) + 1.0), x)

    def transform(self, x: np.ndarray, s: dict[str, list[str]] | None = None) -> np.ndarray:
        """The transformed matrix of ``x`` ([N, k] double) and the string columns ``s``."""
        work = self._apply_log(np.asarray(x, dtype=np.float64))
        block = (work[:, self.keep] - np.array(self.mean)) * np.array(self.inv_std)
        parts = [block]
        if self.terms:
            padded = np.concatenate([block, np.ones((block.shape[0], 1))], axis=1)
            prod = None
            for idx in self._term_index():
                g = padded[:, idx]
                prod = g if prod is None else prod * g
            parts.append(prod)
        for j, edges in sorted(self.buckets.items()):
            above = (work[:, j : j + 1] >= np.array(edges)).astype(np.float64)
            d, e = _bucket_matrices(len(edges))
            parts.append(above @ d + e)
        for n in self.strings:
            values = np.array(
                ["" if v is None else str(v) for v in (s or {}).get(n, [])], dtype=object
            )
            cats = np.array(self.categories[n], dtype=object)
            parts.append((values[:, None] == cats[None, :]).astype(np.float64))
        return np.concatenate(parts, axis=1) if len(parts) > 1 else block

    def _term_index(self) -> list[np.ndarray]:
        """Per factor position, the block column of every term (a ones column pads short ones)."""
        ones = len(self.keep)
        depth = max(len(t) for t in self.terms)
        return [
            np.array([t[p] if p < len(t) else ones for t in self.terms], dtype=np.int64)
            for p in range(depth)
        ]

    @property
    def width(self) -> int:
        """Number of output columns."""
        return len(self.columns())

    # ---- ONNX ---------------------------------------------------------------------------------
    def graph(self, g: Graph, x: str, s: dict[str, str]) -> str:
        """Add the nodes reading double matrix ``x`` and string inputs ``s``; return Z's name."""
        work = x
        if self.log:
            mask = np.zeros(len(self.numeric), dtype=bool)
            mask[self.log] = True
            clipped = g.op("Max", [x, g.const(np.array([0.0]), "zero")], "clipped")
            logged = g.op(
                "Log", [g.op("Add", [clipped, g.const(np.array([1.0]), "one")], "plus1")], "logged"
            )
            work = g.op("Where", [g.const(mask, "logmask"), logged, x], "work")
        block = g.op(
            "Gather",
            [work, g.const(np.array(self.keep, dtype=np.int64), "keep")],
            "block_raw",
            axis=1,
        )
        block = g.op("Sub", [block, g.const(np.array(self.mean), "mean")], "centered")
        block = g.op("Mul", [block, g.const(np.array(self.inv_std), "inv_std")], "block")
        parts = [block]
        if self.terms:
            padded = g.op("Concat", [block, ones_column(g, x)], "padded", axis=1)
            prod = None
            for idx in self._term_index():
                col = g.op("Gather", [padded, g.const(idx, "term_idx")], "factor", axis=1)
                prod = col if prod is None else g.op("Mul", [prod, col], "terms")
            assert prod is not None
            parts.append(prod)
        for j, edges in sorted(self.buckets.items()):
            col = g.op(
                "Gather",
                [work, g.const(np.array([j], dtype=np.int64), "bucket_col")],
                "bucket_x",
                axis=1,
            )
            ge = g.op(
                "GreaterOrEqual", [col, g.const(np.array(edges, dtype=np.float64), "edges")], "ge"
            )
            above = g.op("Cast", [ge], "above", to=TensorProto.DOUBLE)
            d, e = _bucket_matrices(len(edges))
            parts.append(
                g.op(
                    "Add",
                    [
                        g.op("MatMul", [above, g.const(d, "bucket_d")], "diff"),
                        g.const(e, "bucket_e"),
                    ],
                    "buckets",
                )
            )
        for n in self.strings:
            cats = self.categories[n]
            index = g.op(
                "LabelEncoder",
                [s[n]],
                f"{n}_index",
                domain="ai.onnx.ml",
                keys_strings=cats,
                values_int64s=list(range(len(cats))),
                default_int64=-1,
            )
            hit = g.op(
                "Equal", [index, g.const(np.arange(len(cats), dtype=np.int64), "codes")], f"{n}_hit"
            )
            parts.append(g.op("Cast", [hit], f"{n}_onehot", to=TensorProto.DOUBLE))
        if len(parts) == 1:
            return block
        return g.op("Concat", parts, "z", axis=1)


def _bucket_matrices(m: int) -> tuple[np.ndarray, np.ndarray]:
    """``onehot = above @ D + e`` for ``above[i] = x >= edge[i]`` (m edges, m + 1 buckets)."""
    d = np.zeros((m, m + 1))
    for i in range(m):
        d[i, i], d[i, i + 1] = -1.0, 1.0
    e = np.zeros(m + 1)
    e[0] = 1.0
    return d, e


def _quantile_edges(col: np.ndarray, buckets: int) -> list[float]:
    col = col[np.isfinite(col)]
    if col.size == 0:
        return [0.0]
    qs = np.quantile(col, np.linspace(0, 1, buckets + 1)[1:-1])
    edges = sorted({float(q) for q in qs})
    return edges or [float(col[0])]


def _top_categories(values: Sequence[Any]) -> list[str]:
    counts = Counter(str(v) for v in values if v is not None and v != "")
    # Most frequent first, ties by name, so the same window always gives the same columns.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_CATEGORIES]
    return sorted(c for c, _ in ranked) or ["(none)"]
