"""Small, comparable summaries of what a pattern returns, the same code on the NNsight and farscope sides.

A tensor becomes its shape, dtype, float64 sum, sum of absolute values and first 8 values (so the
committed reference stays small); containers are summarised item by item; plain Python values stay.
`compare` says where two summaries differ beyond float noise (integer tensors and strings: exactly).
"""

from __future__ import annotations

import math
from typing import Any

import torch

HEAD = 8
REL = 2e-4  # float noise relative to the tensor's scale (its sum of absolute values, or a value)
ABS = 1e-4


def summarize(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        floating = flat.is_floating_point()
        as64 = flat.double() if floating else flat.long()
        return {"tensor": True, "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                "sum": float(as64.sum()), "abssum": float(as64.abs().sum()),
                "head": [float(v) if floating else int(v) for v in as64[:HEAD].tolist()]}
    if isinstance(value, dict):
        return {"dict": {str(k): summarize(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [summarize(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return {"repr": type(value).__name__}


def compare(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Differences between two summaries, as readable lines (empty when they match)."""
    if isinstance(expected, dict) and expected.get("tensor"):
        if not (isinstance(actual, dict) and actual.get("tensor")):
            return [f"{where}: expected a tensor, got {actual!r}"[:300]]
        problems = [f"{where}.{key}: {expected[key]} != {actual[key]}" for key in ("shape", "dtype")
                    if expected[key] != actual[key]]
        if problems:
            return problems
        scale = max(expected["abssum"], 1.0)
        if expected["dtype"].startswith(("float", "bfloat")):
            if abs(expected["sum"] - actual["sum"]) > REL * scale + ABS:
                problems.append(f"{where}.sum: {expected['sum']} != {actual['sum']}")
            for i, (e, a) in enumerate(zip(expected["head"], actual["head"], strict=True)):
                if not math.isclose(e, a, rel_tol=REL * 10, abs_tol=1e-3):
                    problems.append(f"{where}.head[{i}]: {e} != {a}")
        elif expected["sum"] != actual["sum"] or expected["head"] != actual["head"]:
            problems.append(f"{where}: integers differ: {expected['head']} != {actual['head']}")
        return problems
    if isinstance(expected, dict) and "dict" in expected:
        if not (isinstance(actual, dict) and "dict" in actual) or set(expected["dict"]) != set(actual["dict"]):
            return [f"{where}: keys differ: {expected} != {actual}"[:300]]
        return [p for k in expected["dict"] for p in compare(expected["dict"][k], actual["dict"][k], f"{where}.{k}")]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(expected) != len(actual):
            return [f"{where}: expected {len(expected)} items, got {actual!r}"[:300]]
        pairs = enumerate(zip(expected, actual, strict=True))
        return [p for i, (e, a) in pairs for p in compare(e, a, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(actual, (int, float)) and not isinstance(actual, bool):
        return [] if math.isclose(expected, actual, rel_tol=REL * 10, abs_tol=ABS * 10) else [
            f"{where}: {expected} != {actual}"]
    return [] if expected == actual else [f"{where}: {expected!r} != {actual!r}"[:300]]
