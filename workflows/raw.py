"""Raw workflows: a caller's own API-format graph, when an operator allows them (pure).

`{"workflow": "raw", "graph": {node id: {"class_type", "inputs"}}}` is off unless
ALLOW_RAW_WORKFLOWS=true. Then the graph must be structurally sound (bounded size, every
link pointing at an existing node, no cycle, plain values only), every node's class must be
on RAW_NODE_ALLOWLIST, and every `filename_prefix` is replaced by the service's own (output
names are never the caller's). Nothing else is changed: no seed is added.
"""
from __future__ import annotations

import copy
import math
import re

from workflows.render import Rendered

NAME = "raw"
MAX_NODES = 200
MAX_INPUTS = 64
MAX_STRING = 10_000
MAX_CLASS_TYPE = 128
MAX_OUTPUT_INDEX = 63
NODE_ID = re.compile(r"^[A-Za-z0-9_:.\-]{1,64}$")
INPUT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_. \-]{0,63}$")
# Text may span lines; other control characters have no business in a prompt.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
OUTPUT_NODES = frozenset({"SaveImage", "PreviewImage"})
# Inputs naming files inside ComfyUI's folders: no climbing out of them.
FILE_INPUTS = re.compile(r"(^|_)(name|image|ckpt|path|file)$")


class GraphError(ValueError):
    def __init__(self, errors: list[dict], code: str = "invalid_parameters"):
        super().__init__(errors[0]["message"])
        self.errors, self.code = errors, code


def parse_allowlist(value: str) -> frozenset[str]:
    return frozenset(c.strip() for c in value.split(",") if c.strip())


def _error(field: str, message: str, kind: str) -> dict:
    return {"field": field, "message": message, "type": kind}


def _is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _check_value(field: str, name: str, value, nodes: dict, node_id: str) -> dict | None:
    if isinstance(value, bool) or value is None:
        return None if isinstance(value, bool) else _error(field, "null is not an input value", "type")
    if isinstance(value, int):
        return None if abs(value) < 2**63 else _error(field, "integer out of range", "range")
    if isinstance(value, float):
        return None if math.isfinite(value) else _error(field, "must be a finite number", "range")
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            return _error(field, f"at most {MAX_STRING} characters", "string_too_long")
        if CONTROL.search(value):
            return _error(field, "control characters are not allowed", "string_pattern")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return _error(field, "not valid Unicode text (a lone surrogate)", "string_unicode")
        if FILE_INPUTS.search(name) and (".." in value or value.startswith(("/", "\\")) or "\\" in value
                                         or ":" in value):
            return _error(field, "must be a file name inside ComfyUI's folders", "file_name")
        return None
    if _is_link(value):
        source, index = value
        if source not in nodes:
            return _error(field, f"links to node {source[:64]!r}, which is not in the graph", "link")
        if source == node_id:
            return _error(field, "a node cannot link to itself", "link")
        if not 0 <= index <= MAX_OUTPUT_INDEX:
            return _error(field, f"output index must be 0 … {MAX_OUTPUT_INDEX}", "link")
        return None
    return _error(field, "must be a string, number, boolean or a link [node id, output index]", "type")


def _cycle(graph: dict) -> str | None:
    """A node on a cycle of links, or None (iterative: a deep chain cannot exhaust the stack)."""
    state: dict[str, int] = {}  # 1 visiting, 2 done
    for root in graph:
        if state.get(root):
            continue
        stack = [(root, iter(_links(graph[root])))]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(child) == 1:
                return child
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(_links(graph[child]))))
    return None


def _links(node: dict):
    return (v[0] for v in node["inputs"].values() if _is_link(v))


def validate(graph, allowlist: frozenset[str], max_nodes: int = MAX_NODES) -> dict:
    """The graph if it may run, else GraphError listing each fault with its field path."""
    if not isinstance(graph, dict):
        raise GraphError([_error("graph", "must be an object of node id → {class_type, inputs}", "type")])
    if not 1 <= len(graph) <= max_nodes:
        raise GraphError([_error("graph", f"must have 1 … {max_nodes} nodes", "size")])
    errors: list[dict] = []
    refused: list[dict] = []
    for node_id, node in graph.items():
        where = f"graph.{node_id[:64]}"
        if not NODE_ID.match(node_id):
            errors.append(_error(where, f"node ids must match {NODE_ID.pattern}", "node_id"))
            continue
        if not isinstance(node, dict):
            errors.append(_error(where, "must be an object {class_type, inputs}", "type"))
            continue
        extra = sorted(set(node) - {"class_type", "inputs", "_meta"})
        if extra:
            errors.append(_error(f"{where}.{extra[0][:64]}", "unknown field (class_type, inputs, _meta)", "extra"))
        class_type, inputs = node.get("class_type"), node.get("inputs")
        if not isinstance(class_type, str) or not 1 <= len(class_type) <= MAX_CLASS_TYPE:
            errors.append(_error(f"{where}.class_type", f"must be a string of 1 … {MAX_CLASS_TYPE} characters",
                                 "type"))
        elif class_type not in allowlist:
            refused.append(_error(f"{where}.class_type", f"node class {class_type!r} is not allowed here",
                                  "node_not_allowed"))
        meta = node.get("_meta", {})
        if not isinstance(meta, dict) or set(meta) - {"title"} or not isinstance(meta.get("title", ""), str) \
                or len(meta.get("title", "")) > 200:
            errors.append(_error(f"{where}._meta", "only {\"title\": string ≤ 200}", "type"))
        if not isinstance(inputs, dict):
            errors.append(_error(f"{where}.inputs", "must be an object of input name → value", "type"))
            continue
        if len(inputs) > MAX_INPUTS:
            errors.append(_error(f"{where}.inputs", f"at most {MAX_INPUTS} inputs", "size"))
            continue
        for name, value in inputs.items():
            if not INPUT_NAME.match(name):
                errors.append(_error(f"{where}.inputs.{name[:64]}", f"input names must match {INPUT_NAME.pattern}",
                                     "input_name"))
                continue
            problem = _check_value(f"{where}.inputs.{name}", name, value, graph, node_id)
            if problem:
                errors.append(problem)
    if errors:
        raise GraphError(errors)
    if refused:
        raise GraphError(refused, code="node_not_allowed")
    looped = _cycle(graph)
    if looped is not None:
        raise GraphError([_error(f"graph.{looped}", "the links form a cycle", "cycle")])
    return graph


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def render_raw(graph: dict, output_prefix: str) -> Rendered:
    """A validated graph as a job: output names set by the service, cost from its sampler steps."""
    api = copy.deepcopy(graph)
    steps_total, area, outputs, checkpoint = 0, 0, 0, None
    for node in api.values():
        inputs, class_type = node["inputs"], node["class_type"]
        if "filename_prefix" in inputs or class_type == "SaveImage":
            inputs["filename_prefix"] = output_prefix
        steps = _int(inputs.get("steps"))
        if "Sampler" in class_type and steps and steps > 0:
            steps_total += steps
        width, height = _int(inputs.get("width")), _int(inputs.get("height"))
        if width and height and width > 0 and height > 0:
            area = max(area, width * height * max(_int(inputs.get("batch_size")) or 1, 1))
        if class_type in OUTPUT_NODES:
            outputs += 1
        if checkpoint is None and isinstance(inputs.get("ckpt_name"), str):
            checkpoint = inputs["ckpt_name"]
    scale = area / 1024**2 if area else 1.0
    classes = sorted({n["class_type"] for n in api.values()})
    return Rendered(
        workflow=NAME, params={"nodes": len(api), "class_types": classes, "steps": steps_total}, api=api, ui={},
        expected_images=outputs, cost=round(max(steps_total, 1) * scale, 6), checkpoint=checkpoint,
        progress_repeats={},
    )
