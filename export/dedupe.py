"""Merge duplicate nodes of an ONNX graph (common subexpression elimination).

Quantized layers export one by one: three projections that read the same
activation each write their own smoothing Mul and DynamicQuantizeLinear. When
those are identical (same op, attributes and inputs, constants equal by value)
one copy is enough, and the runtime quantizes that activation once.
``drop_unused`` then removes what no longer feeds an output.
"""

from __future__ import annotations

import hashlib


def _constant_key(node) -> str:
    h = hashlib.sha256()
    for attr in node.attribute:
        h.update(attr.SerializeToString(deterministic=True))
    return h.hexdigest()


def dedupe_nodes(model) -> int:
    """Remove duplicate nodes of the main graph in place; returns how many were removed."""
    from onnx import AttributeProto

    graph = model.graph
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # subgraphs may read outer names by name; leave graphs with control flow alone
    protected = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    seen: dict[tuple, list[str]] = {}
    kept = []
    removed = 0
    for node in graph.node:
        inputs = [rename.get(i, i) for i in node.input]
        del node.input[:]
        node.input.extend(inputs)
        if node.op_type == "Constant":
            key = ("Constant", _constant_key(node))
        else:
            attrs = tuple(a.SerializeToString(deterministic=True) for a in sorted(node.attribute, key=lambda a: a.name))
            key = (node.domain, node.op_type, tuple(inputs), attrs, len(node.output))
        first = seen.get(key)
        if first is not None and not (set(node.output) & protected):
            rename.update({out: keep for out, keep in zip(node.output, first) if out})
            removed += 1
            continue
        seen.setdefault(key, list(node.output))
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return removed


def drop_unused(model) -> int:
    """Remove nodes whose outputs nothing reads and initializers no node reads; returns how many went.

    A quantized layer's export leaves the Constants of its torch simulation behind,
    and rewrites leave replaced scales; ONNX Runtime would warn about each one on
    every session it opens.
    """
    from onnx import AttributeProto

    graph = model.graph
    if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # subgraphs may read outer names by name
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):  # nodes are in topological order: readers come after producers
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    graph_inputs = {i.name for i in graph.input}
    used = [t for t in graph.initializer if t.name in needed or t.name in graph_inputs]
    dropped = len(graph.initializer) - len(used)
    del graph.initializer[:]
    graph.initializer.extend(used)
    return removed + dropped
