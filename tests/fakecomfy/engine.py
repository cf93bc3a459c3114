"""Prompt validation and execution planning, ported from ComfyUI 0.3.64's execution.py and
comfy_execution/graph.py so the fake rejects, orders and caches exactly like a real server.

Checked against the traces: validation bodies of 08, the execution order 4,5,7,6,3,8,9 of
the txt2img graph (10) and 1,4,2,3 of the no-model graph (06), and the cache behaviour of
07/08/20/22.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.fakecomfy import facts

Prompt = dict[str, dict[str, Any]]


def is_link(value: Any) -> bool:
    return isinstance(value, list)


def _error(kind: str, message: str, details: str = "", extra: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra or {}}


@dataclass
class Validation:
    ok: bool
    error: dict[str, Any] | None
    good_outputs: list[str]
    node_errors: dict[str, Any]


def _input_info(definition: Mapping[str, Any], name: str) -> tuple[Any, str, dict[str, Any]]:
    inputs = definition.get("input") or {}
    for category in ("required", "optional", "hidden"):
        section = inputs.get(category) or {}
        if name in section:
            spec = section[name]
            spec = spec if isinstance(spec, list) else [spec]
            extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return spec[0], category, dict(extra)
    return None, "", {}


def _types_match(received: Any, wanted: Any) -> bool:
    if isinstance(wanted, list) or isinstance(received, list):
        return True  # a link into a combo: ComfyUI checks "COMBO", we do not model it
    if received == "*" or wanted == "*":
        return True
    return bool(set(str(received).split(",")) & set(str(wanted).split(",")))


class Validator:
    """``validate_prompt``/``validate_inputs`` with ComfyUI's exact error shapes."""

    def __init__(self, object_info: Mapping[str, Any], input_exists: Callable[[str], bool]
                 ) -> None:
        self.object_info = object_info
        self.input_exists = input_exists

    def validate(self, prompt: Prompt) -> Validation:
        outputs: list[str] = []
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return Validation(False, _error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'"), [], {})
            class_type = node["class_type"]
            if class_type not in self.object_info:
                return Validation(False, _error(
                    "invalid_prompt",
                    f"Cannot execute because node {class_type} does not exist.",
                    f"Node ID '#{node_id}'"), [], {})
            if self.object_info[class_type].get("output_node"):
                outputs.append(node_id)
        if not outputs:
            return Validation(False, _error("prompt_no_outputs", "Prompt has no outputs"), [], {})
        # ComfyUI iterates a set here, so the real order is arbitrary per process; the
        # traces show ["4", "3"] for nodes 3 and 4, which reversed prompt order reproduces.
        outputs.reverse()

        good: list[str] = []
        output_errors: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        validated: dict[str, tuple[bool, list[dict[str, Any]], str]] = {}
        for out in outputs:
            try:
                valid, reasons, _ = self._validate_inputs(prompt, out, validated)
            except KeyError as exc:
                valid = False
                reasons = [_error("exception_during_validation", "Exception when validating node",
                                  str(exc), {"exception_type": "KeyError", "traceback": []})]
                validated[out] = (False, reasons, out)
            if valid:
                good.append(out)
                continue
            if reasons:
                output_errors.append((out, reasons))
            # As in ComfyUI: every failed node validated so far lists this output.
            for node_id, (ok, node_reasons, _) in validated.items():
                if ok is not True and node_reasons:
                    entry = node_errors.setdefault(node_id, {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    })
                    entry["dependent_outputs"].append(out)
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}"
                                for _o, errors in output_errors for e in errors)
            return Validation(False, _error("prompt_outputs_failed_validation",
                                            "Prompt outputs failed validation", details),
                              [], node_errors)
        return Validation(True, None, good, node_errors)

    def _validate_inputs(self, prompt: Prompt, unique_id: str,
                         validated: dict[str, tuple[bool, list[dict[str, Any]], str]]
                         ) -> tuple[bool, list[dict[str, Any]], str]:
        if unique_id in validated:
            return validated[unique_id]
        node = prompt[unique_id]
        inputs = node.setdefault("inputs", {})
        class_type = node["class_type"]
        definition = self.object_info[class_type]
        section = definition.get("input") or {}
        names = list((section.get("required") or {}).keys())
        names += [n for n in (section.get("optional") or {}) if n not in names]
        # LoadImage has VALIDATE_INPUTS(image): its combo list is not checked, the file is.
        custom = ["image"] if class_type == "LoadImage" else []
        errors: list[dict[str, Any]] = []
        valid = True
        for name in names:
            input_type, category, extra = _input_info(definition, name)
            info = [input_type, extra]
            if name not in inputs:
                if category == "required":
                    errors.append(_error("required_input_missing", "Required input is missing",
                                         name, {"input_name": name}))
                continue
            value = inputs[name]
            if is_link(value):
                if len(value) != 2:
                    errors.append(_error(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        name, {"input_name": name, "input_config": info, "received_value": value}))
                    continue
                source_id = value[0]
                source_class = prompt[source_id]["class_type"]  # KeyError like ComfyUI
                returns = self.object_info[source_class].get("output") or []
                received = returns[value[1]] if 0 <= value[1] < len(returns) else None
                if not _types_match(received, input_type):
                    errors.append(_error(
                        "return_type_mismatch", "Return type mismatch between linked nodes",
                        f"{name}, received_type({received}) mismatch input_type({input_type})",
                        {"input_name": name, "input_config": info, "received_type": received,
                         "linked_node": value}))
                    continue
                try:
                    result = self._validate_inputs(prompt, source_id, validated)
                    if result[0] is False:
                        valid = False
                        continue
                except KeyError as exc:
                    valid = False
                    validated[source_id] = (False, [_error(
                        "exception_during_inner_validation", "Exception when validating inner node",
                        str(exc),
                        {"input_name": name, "input_config": info, "exception_message": str(exc),
                         "exception_type": "KeyError",
                         "traceback": facts.inner_validation_traceback(), "linked_node": value})],
                        source_id)
                    continue
                continue
            try:
                if input_type == "INT":
                    value = int(value)
                elif input_type == "FLOAT":
                    value = float(value)
                elif input_type == "STRING":
                    value = str(value)
                elif input_type == "BOOLEAN":
                    value = bool(value)
                inputs[name] = value
            except (TypeError, ValueError) as exc:
                errors.append(_error(
                    "invalid_input_type",
                    f"Failed to convert an input value to a {input_type} value",
                    f"{name}, {value}, {exc}",
                    {"input_name": name, "input_config": info, "received_value": value,
                     "exception_message": str(exc)}))
                continue
            if name in custom:
                continue
            if "min" in extra and isinstance(value, int | float) and value < extra["min"]:
                errors.append(_error(
                    "value_smaller_than_min", f"Value {value} smaller than min of {extra['min']}",
                    name, {"input_name": name, "input_config": info, "received_value": value}))
                continue
            if "max" in extra and isinstance(value, int | float) and value > extra["max"]:
                errors.append(_error(
                    "value_bigger_than_max", f"Value {value} bigger than max of {extra['max']}",
                    name, {"input_name": name, "input_config": info, "received_value": value}))
                continue
            if isinstance(input_type, list) and value not in input_type:
                # Long lists (scanned model files) are not echoed back.
                if len(input_type) > 20:
                    list_info, config = f"(list of length {len(input_type)})", None
                else:
                    list_info, config = str(input_type), info
                errors.append(_error(
                    "value_not_in_list", "Value not in list",
                    f"{name}: '{value}' not in {list_info}",
                    {"input_name": name, "input_config": config, "received_value": value}))
                continue
        for name in custom:
            if name in inputs and not is_link(inputs[name]) and not self.input_exists(inputs[name]):
                errors.append({"type": "custom_validation_failed",
                               "message": "Custom validation failed for node",
                               "details": f"{name} - Invalid image file: {inputs[name]}",
                               "extra_info": {"input_name": name}})
        result = (False, errors, unique_id) if errors or not valid else (True, [], unique_id)
        validated[unique_id] = result
        return result


# ---------------------------------------------------------------------------------------
# Execution planning (comfy_execution/graph.py ExecutionList)


@dataclass
class ExecutionList:
    prompt: Prompt
    is_output: Callable[[str], bool]
    is_cached: Callable[[str], bool]
    pending: dict[str, bool] = field(default_factory=dict)
    block_count: dict[str, int] = field(default_factory=dict)
    blocking: dict[str, dict[str, bool]] = field(default_factory=dict)

    def add_node(self, node_id: str) -> None:
        # Iterative with a stack, as in 0.3.64: this is what yields 4,5,7,6 for txt2img.
        stack = [node_id]
        links: list[tuple[str, str]] = []
        while stack:
            uid = stack.pop()
            if uid in self.pending:
                continue
            self.pending[uid] = True
            self.block_count[uid] = 0
            self.blocking[uid] = {}
            for value in self.prompt[uid].get("inputs", {}).values():
                if is_link(value) and len(value) == 2:
                    if not self.is_cached(value[0]):
                        stack.append(value[0])
                    links.append((value[0], uid))
        for source, target in links:
            if not self.is_cached(source):
                if target not in self.blocking[source]:
                    self.blocking[source][target] = True
                    self.block_count[target] += 1

    def next_node(self) -> str | None:
        available = [n for n in self.pending if self.block_count[n] == 0]
        if not available:
            return None
        for node_id in available:
            if self.is_output(node_id):
                return node_id
        for node_id in available:
            if any(self.is_output(b) for b in self.blocking[node_id]):
                return node_id
        for node_id in available:
            for blocked in self.blocking[node_id]:
                if any(self.is_output(b) for b in self.blocking[blocked]):
                    return node_id
        return available[0]

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        for blocked in self.blocking.pop(node_id, {}):
            self.block_count[blocked] -= 1


def signatures(prompt: Prompt, extra: Callable[[str, dict[str, Any]], str] | None = None
               ) -> dict[str, str]:
    """A content signature per node: same class, inputs and ancestry -> same signature.

    ComfyUI's classic cache is keyed like this, which is why re-running the same checkpoint
    and text hits the cache for nodes 4, 6, 7 (and 5) even under another prompt id.
    """
    memo: dict[str, str] = {}

    def sign(node_id: str, trail: frozenset[str]) -> str:
        if node_id in memo:
            return memo[node_id]
        node = prompt.get(node_id)
        if node is None or node_id in trail:
            return f"missing:{node_id}"
        parts: list[Any] = [node.get("class_type")]
        for name in sorted(node.get("inputs", {})):
            value = node["inputs"][name]
            if is_link(value) and len(value) == 2:
                parts.append([name, sign(value[0], trail | {node_id}), value[1]])
            else:
                parts.append([name, value])
        if extra is not None:
            parts.append(extra(node_id, node))
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
        memo[node_id] = digest
        return digest

    return {node_id: sign(node_id, frozenset()) for node_id in prompt}
