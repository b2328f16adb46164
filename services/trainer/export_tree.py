"""Hoeffding adaptive trees as exact ONNX graphs (standard operators, double precision).

River's adaptive tree answers with every leaf an input reaches: the main tree's leaf plus the
leaves of the alternate subtrees hanging on the path (summed class votes, normalised, for the
classifier; the mean leaf value for the regressor). Each such (path, subtree) is flattened into
leaves, and each leaf into the list of split literals on its path. The graph evaluates every
split once (``x[f] <= t``, on the input cast to double), a leaf's indicator is the minimum of its
0/1 literals, and a MatMul
sums the reached leaves' votes: no TreeEnsemble operator, so thresholds keep double precision
and ONNX Runtime agrees with river to rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from river.tree.base import Branch

from loopline.services.trainer.errors import TreeExportError

Literal = tuple[int, bool]  # (split index, takes the left "<=" branch)


class _Flattener:
    def __init__(self, learner: Any) -> None:
        self.learner = learner
        self.features = learner.features
        self.splits: list[tuple[int, float]] = []
        self.leaves: list[tuple[list[Literal], np.ndarray]] = []

    def split(self, node: Any) -> int:
        if not hasattr(node, "threshold") or len(node.children) != 2:
            raise TreeExportError("tree export supports numeric binary splits only, not "
                                  f"{type(node).__name__}")
        if node.feature not in self.features:
            raise TreeExportError(f"tree splits on {node.feature!r}, which is not a model input")
        self.splits.append((self.features.index(node.feature), float(node.threshold)))
        return len(self.splits) - 1

    def walk(self, node: Any, path: list[Literal]) -> None:
        """Emit every leaf of the subtree at ``node``, plus alternates along its branches."""
        alternate = getattr(node, "_alternate_tree", None)
        if alternate:
            self.walk(alternate, list(path))
        if isinstance(node, Branch):
            s = self.split(node)
            self.walk(node.children[0], [*path, (s, True)])
            self.walk(node.children[1], [*path, (s, False)])
        else:
            self.leaves.append((path, self.leaf_value(node)))

    def leaf_value(self, leaf: Any) -> np.ndarray:
        if self.learner.task == "regression":
            return np.array([float(leaf.stats.mean.get())])
        stats = leaf.stats or {}
        total = float(sum(stats.values()))
        dist = np.array([stats.get(c, 0.0) / total if total else 0.0 for c in self.learner.classes])
        err = leaf._mean_error.get() if hasattr(leaf, "_mean_error") else 0.0
        factor = dist.sum() * err * err
        return dist / factor if factor else dist  # river weighs a leaf by its ADWIN-monitored error


def tree_graph(learner: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """Nodes, initializers and outputs of the ONNX graph of a river Hoeffding adaptive tree."""
    root = learner.model._root
    flat = _Flattener(learner)
    if root is not None:
        flat.walk(root, [])
    n_out = 1 if learner.task == "regression" else len(learner.classes)
    if not flat.leaves:
        flat.leaves.append(([], np.zeros(n_out)))
    n_splits = len(flat.splits)
    depth = max(1, max(len(p) for p, _ in flat.leaves))
    ones_col = 2 * n_splits  # index of the constant-1 column that pads short paths
    idx = np.full((len(flat.leaves), depth), ones_col, dtype=np.int64)
    for i, (path, _) in enumerate(flat.leaves):
        for j, (s, left) in enumerate(path):
            idx[i, j] = s if left else n_splits + s
    values = np.stack([v for _, v in flat.leaves])
    inits = [numpy_helper.from_array(idx, "leaf_literals"),
             numpy_helper.from_array(values, "leaf_values"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "col0"),
             numpy_helper.from_array(np.array([0.0]), "zero"),
             numpy_helper.from_array(np.array([1.0]), "one")]
    nodes = [helper.make_node("Gather", ["x64", "col0"], ["first_col"], axis=1),
             helper.make_node("Mul", ["first_col", "zero"], ["zeros_col"]),
             helper.make_node("Add", ["zeros_col", "one"], ["ones_col"])]
    if n_splits:
        inits += [numpy_helper.from_array(np.array([f for f, _ in flat.splits], dtype=np.int64),
                                          "split_feature"),
                  numpy_helper.from_array(np.array([t for _, t in flat.splits]), "split_threshold")]
        nodes += [helper.make_node("Gather", ["x64", "split_feature"], ["split_x"], axis=1),
                  helper.make_node("LessOrEqual", ["split_x", "split_threshold"], ["goes_left"]),
                  helper.make_node("Cast", ["goes_left"], ["left"], to=TensorProto.DOUBLE),
                  helper.make_node("Sub", ["one", "left"], ["right"]),
                  helper.make_node("Concat", ["left", "right", "ones_col"], ["literals"], axis=1)]
    else:
        nodes.append(helper.make_node("Identity", ["ones_col"], ["literals"]))
    # [N, L, depth]
    nodes += [helper.make_node("Gather", ["literals", "leaf_literals"], ["paths"], axis=1),
              helper.make_node("ReduceMin", ["paths"], ["reached"], axes=[2], keepdims=0)]  # [N, L]
    if learner.task == "regression":
        inits.append(numpy_helper.from_array(np.ones((len(flat.leaves), 1)), "leaf_ones"))
        nodes += [helper.make_node("MatMul", ["reached", "leaf_values"], ["total"]),
                  helper.make_node("MatMul", ["reached", "leaf_ones"], ["count"]),
                  helper.make_node("Div", ["total", "count"], ["variable"])]
        return nodes, inits, [helper.make_tensor_value_info("variable", TensorProto.DOUBLE,
                                                            ["N", 1])]
    classes = learner.classes
    inits += [numpy_helper.from_array(np.array([1e-300]), "tiny"),
              numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
    nodes += [helper.make_node("MatMul", ["reached", "leaf_values"], ["votes"]),
              helper.make_node("ReduceSum", ["votes", "axis1"], ["vote_sum"], keepdims=1),
              # river leaves all-zero votes as they are: dividing by a tiny number keeps them zero.
              helper.make_node("Max", ["vote_sum", "tiny"], ["vote_total"]),
              helper.make_node("Div", ["votes", "vote_total"], ["probabilities"]),
              helper.make_node("ArgMax", ["probabilities"], ["label_index"], axis=1, keepdims=0),
              helper.make_node("LabelEncoder", ["label_index"], ["label"], domain="ai.onnx.ml",
                               keys_int64s=list(range(len(classes))), values_strings=classes,
                               default_string="")]
    outputs = [helper.make_tensor_value_info("label", TensorProto.STRING, ["N"]),
               helper.make_tensor_value_info("probabilities", TensorProto.DOUBLE,
                                             ["N", len(classes)])]
    return nodes, inits, outputs
