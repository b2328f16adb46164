"""A fast accept check for raw events, generated once per pipeline spec as straight-line Python.

Only a fast path: a message it does not accept goes through the full
:class:`~loopline.validation.Validator`, which decides and explains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loopline.spec import PipelineSpec

_TS_MAX = 253_402_300_799_999
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_source(spec: PipelineSpec) -> tuple[str, dict[str, Any]]:
    """Source of ``fast_accept(doc) -> bool``: True only if the full validator would accept unchanged."""
    env: dict[str, Any] = {"_names": frozenset(f.name for f in spec.features),
                           "_top": frozenset(("event_id", "key", "ts", "features")), "_INT64_MIN": _INT64_MIN,
                           "_INT64_MAX": _INT64_MAX, "_TS_MAX": _TS_MAX}
    lines = [
        "def fast_accept(d):",
        "    g = d.get",
        "    v = g('event_id')",
        "    if v is not None and (type(v) is not str or not v): return False",
        "    v = g('key')",
        "    if v is not None and type(v) is not str: return False",
        "    v = g('ts')",
        # ISO strings take the full path (they need parsing); ints are checked here.
        "    if v is not None and (type(v) is not int or not 0 <= v <= _TS_MAX): return False",
        "    f = g('features')",
        "    if type(f) is not dict: return False",
        "    g = f.get",
    ]
    for i, feat in enumerate(spec.features):
        cond: list[str] = []
        if feat.type == "float":
            cond.append("(type(v) is not float and type(v) is not int)")
            if feat.min is None or feat.max is None:
                cond.append("v - v != 0")  # NaN and +-inf
        elif feat.type == "int":
            cond.append("type(v) is not int")
            if feat.min is None or feat.max is None or feat.min < _INT64_MIN or feat.max > _INT64_MAX:
                cond.append("not _INT64_MIN <= v <= _INT64_MAX")
        elif feat.type == "string":
            cond.append("type(v) is not str")
            if feat.values is not None:
                env[f"_allowed{i}"] = frozenset(feat.values)
                cond.append(f"v not in _allowed{i}")
        else:
            cond.append("type(v) is not bool")
        if feat.min is not None:
            cond.append(f"not v >= {float(feat.min)!r}")
        if feat.max is not None:
            cond.append(f"not v <= {float(feat.max)!r}")
        lines.append(f"    v = g({feat.name!r})")
        test = " or ".join(cond)
        if feat.required:
            lines.append(f"    if v is None or {test}: return False")
        else:
            lines.append(f"    if v is not None and ({test}): return False")
    lines.append("    return _names.issuperset(f) and _top.issuperset(d)")
    return "\n".join(lines), env


def compile_fast_accept(spec: PipelineSpec) -> Callable[[dict[str, Any]], bool]:
    """The generated fast accept check of ``spec``."""
    source, env = _check_source(spec)
    exec(compile(source, f"<fast_accept {spec.name}>", "exec"), env)  # noqa: S102 - source built above
    return env["fast_accept"]  # type: ignore[no-any-return]
