"""A tiny, safe evaluator for the arithmetic and boolean expressions in family data files.

Family files describe shapes (``"num_attention_heads * head_dim"``) and layer rules
(``"layer >= first_k_dense_replace"``) as expressions over config values. Only literals,
names, attribute access into nested config dicts, arithmetic, comparisons, boolean
operators, ``in`` and ``x if c else y`` are allowed: no calls, no imports.
"""
from __future__ import annotations

import ast
import operator
from functools import lru_cache
from typing import Any, Mapping

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Div: operator.truediv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_, ast.IsNot: operator.is_not,
}


class ExpressionError(ValueError):
    """An expression uses a name the namespace lacks, or a construct that is not allowed."""


@lru_cache(maxsize=None)
def _parse(text: str) -> ast.expr:
    return ast.parse(text, mode="eval").body


def evaluate(text: str | int | float | bool | None, namespace: Mapping[str, Any]) -> Any:
    """Evaluate ``text`` against ``namespace``; non-string values are returned unchanged."""
    if not isinstance(text, str):
        return text
    return _eval(_parse(text), namespace, text)


def _eval(node: ast.AST, ns: Mapping[str, Any], text: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in ns:
            return ns[node.id]
        raise ExpressionError(f"'{node.id}' is not defined in expression {text!r}")
    if isinstance(node, ast.Attribute):
        base = _eval(node.value, ns, text)
        if isinstance(base, Mapping) and node.attr in base:
            return base[node.attr]
        raise ExpressionError(f"'{node.attr}' is not defined in expression {text!r}")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left, ns, text), _eval(node.right, ns, text))
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, ns, text)
        if isinstance(node.op, ast.Not):
            return not value
        if isinstance(node.op, ast.USub):
            return -value
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, ns, text) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, ns, text)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, ns, text)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, ns, text) else node.orelse, ns, text)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(e, ns, text) for e in node.elts]
    raise ExpressionError(f"unsupported construct {type(node).__name__} in expression {text!r}")
