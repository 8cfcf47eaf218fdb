"""Graph decisions the executor needs: cache keys and the order nodes run in.

Pure functions over an API-format graph ({node_id: {class_type, inputs}}).
"""
from __future__ import annotations

import json
from typing import Callable, Mapping

from .validation import is_link


def signatures(prompt: dict, extra: Callable[[str, dict], object] | None = None) -> dict[str, str]:
    """Cache key of every node: its class, its constant inputs and, for links, the key
    of the node it reads from (not the node id).  Like ComfyUI's default ("classic")
    cache, two nodes with the same inputs share a result whatever their ids.
    `extra(class_type, inputs)` adds what IS_CHANGED would (e.g. a file's hash)."""
    memo: dict[str, str] = {}

    def sig(node_id: str, trail: tuple = ()) -> str:
        if node_id in memo:
            return memo[node_id]
        if node_id in trail:  # a cycle: let the executor report it, keep keys distinct
            return f"cycle:{node_id}"
        node = prompt[node_id]
        parts = []
        for name in sorted(node.get("inputs", {})):
            value = node["inputs"][name]
            if is_link(value) and len(value) == 2 and value[0] in prompt:
                parts.append([name, {"from": sig(value[0], trail + (node_id,)), "slot": value[1]}])
            else:
                parts.append([name, value])
        changed = extra(node["class_type"], node.get("inputs", {})) if extra else None
        memo[node_id] = json.dumps([node["class_type"], changed, parts], sort_keys=True, default=str)
        return memo[node_id]

    return {node_id: sig(node_id) for node_id in prompt}


def execution_order(prompt: dict, outputs: list[str], cached: set[str],
                    is_output: Callable[[str], bool]) -> list[str]:
    """The order ComfyUI's ExecutionList runs nodes in.

    Nodes are staged depth-first from each requested output; inputs served from the
    cache are not staged.  Among ready nodes an output node goes first, then a node
    feeding an output, then one two links away, else the first staged one."""
    pending: dict[str, None] = {}
    blockers: dict[str, set[str]] = {}   # node -> nodes it still waits for
    blocking: dict[str, set[str]] = {}   # node -> nodes waiting for it

    def add(node_id: str) -> None:
        stack = [node_id]
        links = []
        while stack:
            current = stack.pop()
            if current in pending:
                continue
            pending[current] = None
            blockers.setdefault(current, set())
            blocking.setdefault(current, set())
            for value in prompt[current]["inputs"].values():
                if is_link(value):
                    source = value[0]
                    if source not in cached:
                        stack.append(source)
                        links.append((source, current))
        for source, target in links:
            blockers[target].add(source)
            blocking.setdefault(source, set()).add(target)

    for output in outputs:
        add(output)

    order: list[str] = []
    while pending:
        ready = [n for n in pending if not blockers[n]]
        if not ready:  # a cycle: ComfyUI reports it as an error; run what we can
            raise ValueError("Dependency cycle detected")
        chosen = _pick(ready, blocking, is_output)
        order.append(chosen)
        del pending[chosen]
        for target in blocking.get(chosen, ()):
            blockers[target].discard(chosen)
    return order


def _pick(ready: list[str], blocking: Mapping[str, set[str]], is_output: Callable[[str], bool]) -> str:
    for node_id in ready:
        if is_output(node_id):
            return node_id
    for node_id in ready:
        if any(is_output(t) for t in blocking.get(node_id, ())):
            return node_id
    for node_id in ready:
        if any(is_output(t2) for t in blocking.get(node_id, ()) for t2 in blocking.get(t, ())):
            return node_id
    return ready[0]
