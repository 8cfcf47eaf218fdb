"""Prompt validation, decided the way ComfyUI 0.8 decides it.

Pure: everything comes in as arguments (the graph, the object_info schemas, the
per-class custom validators), nothing touches the network or the disk.  The error
dicts (types, messages, details, extra_info), the node_errors layout and the
quirks (errors attributed to the output node for a broken direct link, inner
validation errors attributed to the linked node, converted values written back
into the graph) follow the recorded server.
"""
from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# class_type -> fn(inputs) -> True | False | str  (ComfyUI's VALIDATE_INPUTS): its
# argument names skip the built-in min/max/list checks, like the real server does.
CustomValidator = tuple[tuple[str, ...], Callable[..., Any]]


@dataclass
class ValidationResult:
    ok: bool
    error: dict | None
    outputs: list[str]
    node_errors: dict = field(default_factory=dict)
    prompt: dict | None = None  # the graph with converted input values
    failed: list = field(default_factory=list)   # (output id, its own reasons)


def _error(type_: str, message: str, details: str = "", extra_info: dict | None = None) -> dict:
    return {"type": type_, "message": message, "details": details, "extra_info": extra_info or {}}


def full_type_name(klass: type) -> str:
    module = klass.__module__
    if module == "builtins":
        return klass.__qualname__
    return module + "." + klass.__qualname__


def is_link(value: Any) -> bool:
    return isinstance(value, list)


def types_match(received: Any, wanted: Any) -> bool:
    """ComfyUI's validate_node_input: equal, '*' on either side, or overlapping 'A,B' unions."""
    if isinstance(wanted, list):  # a COMBO input fed by a link
        return received in ("COMBO", "*")
    if not isinstance(received, str) or not isinstance(wanted, str):
        return received == wanted
    if received == wanted or "*" in (received, wanted):
        return True
    return bool(set(received.split(",")) & set(wanted.split(",")))


def _input_specs(schema: dict) -> list[tuple[str, str, Any, dict]]:
    """(name, category, type, options) for required then optional inputs, in input_order."""
    specs = []
    inputs = schema.get("input", {})
    order = schema.get("input_order", {})
    for category in ("required", "optional"):
        section = inputs.get(category) or {}
        for name in order.get(category, list(section)):
            spec = section[name]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, category, spec[0], options))
    return specs


def _validate_node(prompt: dict, node_id: str, schemas: Mapping[str, dict],
                   custom: Mapping[str, CustomValidator], validated: dict) -> tuple:
    if node_id in validated:
        return validated[node_id]

    node = prompt[node_id]
    inputs = node["inputs"]
    class_type = node["class_type"]
    schema = schemas[class_type]
    validator_args, validator = custom.get(class_type, ((), None))

    errors: list[dict] = []
    valid = True
    for name, category, input_type, options in _input_specs(schema):
        info = [input_type, options]
        if name not in inputs:
            if category == "required":
                errors.append(_error("required_input_missing", "Required input is missing", name,
                                     {"input_name": name}))
            continue

        value = inputs[name]
        if is_link(value):
            if len(value) != 2:
                errors.append(_error(
                    "bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                    name, {"input_name": name, "input_config": info, "received_value": value}))
                continue
            from_id, slot = value
            # A missing node raises here on purpose: the caller reports it as an
            # exception, exactly like ComfyUI's KeyError on prompt[o_id].
            from_class = prompt[from_id]["class_type"]
            received_type = tuple(schemas[from_class]["output"])[slot]
            if not types_match(received_type, input_type):
                errors.append(_error(
                    "return_type_mismatch", "Return type mismatch between linked nodes",
                    f"{name}, received_type({received_type}) mismatch input_type({input_type})",
                    {"input_name": name, "input_config": info, "received_type": received_type,
                     "linked_node": value}))
                continue
            try:
                result = _validate_node(prompt, from_id, schemas, custom, validated)
                if result[0] is False:
                    valid = False
                    continue
            except Exception as ex:  # noqa: BLE001 - reported, like the real server
                valid = False
                validated[from_id] = (False, [_error(
                    "exception_during_inner_validation", "Exception when validating inner node", str(ex),
                    {"input_name": name, "input_config": info, "exception_message": str(ex),
                     "exception_type": full_type_name(type(ex)),
                     "traceback": traceback.format_tb(ex.__traceback__), "linked_node": value})], from_id)
                continue
            continue

        try:
            if isinstance(value, dict) and "__value__" in value:
                value = value["__value__"]
                inputs[name] = value
            if input_type == "INT":
                value = int(value)
                inputs[name] = value
            elif input_type == "FLOAT":
                value = float(value)
                inputs[name] = value
            elif input_type == "STRING":
                value = str(value)
                inputs[name] = value
            elif input_type == "BOOLEAN":
                value = bool(value)
                inputs[name] = value
        except Exception as ex:  # noqa: BLE001
            errors.append(_error(
                "invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                f"{name}, {value}, {ex}",
                {"input_name": name, "input_config": info, "received_value": value, "exception_message": str(ex)}))
            continue

        if name in validator_args:
            continue  # the node's own validator owns this input
        if "min" in options and value < options["min"]:
            errors.append(_error("value_smaller_than_min", f"Value {value} smaller than min of {options['min']}",
                                 name, {"input_name": name, "input_config": info, "received_value": value}))
            continue
        if "max" in options and value > options["max"]:
            errors.append(_error("value_bigger_than_max", f"Value {value} bigger than max of {options['max']}",
                                 name, {"input_name": name, "input_config": info, "received_value": value}))
            continue
        if isinstance(input_type, list) and value not in input_type:
            # ComfyUI does not echo long lists (e.g. hundreds of model files).
            if len(input_type) > 20:
                list_info, config = f"(list of length {len(input_type)})", None
            else:
                list_info, config = str(input_type), info
            errors.append(_error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {list_info}",
                                 {"input_name": name, "input_config": config, "received_value": value}))
            continue

    if validator is not None:
        arguments = {a: inputs[a] for a in validator_args if a in inputs and not is_link(inputs[a])}
        verdict = validator(**arguments)
        if verdict is not True:
            for a in arguments:
                details = a if verdict is False else f"{a} - {verdict}"
                errors.append(_error("custom_validation_failed", "Custom validation failed for node", details,
                                     {"input_name": a}))

    result = (False, errors, node_id) if errors or valid is not True else (True, [], node_id)
    validated[node_id] = result
    return result


def validate_prompt(prompt: Any, schemas: Mapping[str, dict], custom: Mapping[str, CustomValidator] | None = None,
                    partial_targets: list[str] | None = None) -> ValidationResult:
    """Validate an API-format graph.  A malformed graph (not a dict of dicts) raises,
    which the HTTP layer turns into ComfyUI's plain 500 like the real server."""
    custom = custom or {}
    prompt = copy.deepcopy(prompt)
    outputs: list[str] = []
    for node_id in prompt:
        node = prompt[node_id]
        if "class_type" not in node:
            return ValidationResult(False, _error(
                "invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'"), [], {})
        class_type = node["class_type"]
        schema = schemas.get(class_type) if isinstance(class_type, str) else None
        if schema is None:
            return ValidationResult(False, _error(
                "invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                f"Node ID '#{node_id}'"), [], {})
        if schema.get("output_node") is True and (partial_targets is None or node_id in partial_targets):
            outputs.append(node_id)

    if not outputs:
        return ValidationResult(False, _error("prompt_no_outputs", "Prompt has no outputs"), [], {})

    good: list[str] = []
    failed: list[tuple[str, list]] = []
    node_errors: dict = {}
    validated: dict = {}
    for output in outputs:
        try:
            valid, reasons, _ = _validate_node(prompt, output, schemas, custom, validated)
        except Exception as ex:  # noqa: BLE001
            valid = False
            reasons = [_error("exception_during_validation", "Exception when validating node", str(ex),
                              {"exception_type": full_type_name(type(ex)),
                               "traceback": traceback.format_tb(ex.__traceback__)})]
            validated[output] = (False, reasons, output)
        if valid is True:
            good.append(output)
            continue
        failed.append((output, reasons))
        # Every node validated so far that carries its own errors gets this output as a
        # dependant (nodes that are invalid only because of their inputs carry none).
        for node_id, (ok, node_reasons, _) in validated.items():
            if ok is not True and node_reasons:
                entry = node_errors.setdefault(node_id, {
                    "errors": node_reasons, "dependent_outputs": [],
                    "class_type": prompt[node_id]["class_type"]})
                entry["dependent_outputs"].append(output)

    if not good:
        details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failed for r in reasons)
        return ValidationResult(False, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                                              details), [], node_errors, prompt, failed)
    return ValidationResult(True, None, good, node_errors, prompt, failed)


def validation_log_lines(result: ValidationResult) -> list[str]:
    """The lines ComfyUI logs for each output that failed validation."""
    lines, shown = [], set()
    for output, reasons in result.failed:
        lines.append(f"Failed to validate prompt for output {output}:")
        if reasons:
            lines.append("* (prompt):")
            lines.extend(f"  - {r['message']}: {r['details']}" for r in reasons)
        for node_id, entry in result.node_errors.items():
            if output in entry["dependent_outputs"] and node_id not in shown:
                shown.add(node_id)
                lines.append(f"* {entry['class_type']} {node_id}:")
                lines.extend(f"  - {r['message']}: {r['details']}" for r in entry["errors"])
        lines.append("Output will be ignored")
    return lines
