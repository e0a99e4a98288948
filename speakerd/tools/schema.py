"""JSON schemas of tools' arguments: made into what the Realtime API takes, and checked.

`to_parameters` turns the input schema an MCP server sends into function `parameters`
the Realtime API accepts, or says why that cannot be done; `validate` checks the
model's arguments against that same schema before any call.

What the Realtime API refuses (it answers `invalid_function_parameters` and the whole
session.update fails, every tool with it): parameters that are not `type: object` or
that have `anyOf`/`oneOf`/`allOf`/`enum`/`not` at the top level; an array schema
without `items`; an object schema without `properties`. Nested unions, `null`,
`enum`, `default`, `format` and `additionalProperties` pass as they are. `$ref`s are
written out in place here, since nothing else resolves them for the model; only a
schema that refers to itself cannot be written out.
"""

from __future__ import annotations

import copy
import math
import operator
import re
from collections.abc import Mapping
from typing import Any

TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str, "integer": (int, float), "number": (int, float), "boolean": bool,
    "object": dict, "array": list, "null": type(None)}
MAX_PARTS = 5000  # schema nodes once $refs are written out: a bound on a DAG's blow-up
_DROPPED = ("$defs", "definitions", "$schema", "$id", "$comment", "$anchor")
_ONE = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else",
        "contains", "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")
_NAMED = ("properties", "patternProperties", "dependentSchemas")
_LOWER = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


class ArgumentError(ValueError):
    """The model's arguments do not fit the tool's schema; the message names the field."""

    def __init__(self, message: str, where: str = "", *, wrong_type: bool = False) -> None:
        super().__init__(message)
        self.where = where  # the field at fault ("" for the arguments as a whole)
        self.wrong_type = wrong_type  # that field is of a type the schema does not allow


class Refused(Exception):
    """Why an input schema cannot be offered to the model."""


# --- offering ------------------------------------------------------------------------

def to_parameters(schema: Any) -> dict[str, Any] | str:
    """An MCP tool's inputSchema as Realtime function parameters, or why it cannot be."""
    if not isinstance(schema, dict):
        return "its input schema is not an object"
    try:
        out = _Inliner(schema).walk(schema, "arguments", ("#",))
        out = _top(out)
        _for_realtime(out, "arguments")
    except Refused as e:
        return str(e)
    return out


class _Inliner:
    """Writes each local `$ref` out in place and merges each `allOf` it can."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.parts = 0

    def walk(self, node: Any, where: str, refs: tuple[str, ...]) -> Any:
        if not isinstance(node, dict):
            return node
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise Refused(f"its schema has over {MAX_PARTS} parts once its $refs are "
                          "written out")
        if "$dynamicRef" in node or "$recursiveRef" in node:
            raise Refused(f"{where} refers to itself (a recursive schema cannot be written "
                          "out)")
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROPPED or key == "$ref":
                continue
            if key in _ONE:
                out[key] = (self.walk(value, f"{where}.{key}", refs) if isinstance(value, dict)
                            else [self.walk(v, f"{where}.{key}[{i}]", refs)
                                  for i, v in enumerate(value)]
                            if isinstance(value, list) else value)
            elif key in _MANY and isinstance(value, list):
                out[key] = [self.walk(v, f"{where}.{key}[{i}]", refs)
                            for i, v in enumerate(value)]
            elif key in _NAMED and isinstance(value, dict):
                out[key] = {name: self.walk(v, f"{where}.{name}" if key == "properties"
                                            else f"{where}.{key}.{name}", refs)
                            for name, v in value.items()}
            else:
                out[key] = copy.deepcopy(value)
        if "$ref" in node:
            ref = node["$ref"]
            if ref in refs:
                raise Refused(f"{where} refers back to {ref}, which holds it: a recursive "
                              "schema cannot be written out")
            target = self.walk(self._resolve(ref, where), where, (*refs, ref))
            out = _merge([target, out], where) if out else target
        if "allOf" in out:
            merged = _merge([{k: v for k, v in out.items() if k != "allOf"}, *out["allOf"]],
                            where, strict=False)
            if merged is not None:
                out = merged
        return out

    def _resolve(self, ref: Any, where: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise Refused(f"{where} uses $ref {ref!r}, outside its own schema")
        node: Any = self.root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise Refused(f"{where} uses $ref {ref!r}, which is not in its schema")
        return node


def _merge(schemas: list[Any], where: str, strict: bool = True) -> dict[str, Any] | None:
    """One schema that means all of `schemas` (allOf); None (or Refused when `strict`)
    when two of them set the same keyword to values that cannot be combined."""
    out: dict[str, Any] = {}
    for schema in schemas:
        if schema is True:
            continue
        if not isinstance(schema, dict):
            if strict:
                raise Refused(f"{where} has an allOf that nothing can match")
            return None
        for key, value in schema.items():
            if key not in out:
                out[key] = value
            elif key == "properties":
                both = dict(out[key])
                for name, sub in value.items():
                    both[name] = (_merge([both[name], sub], f"{where}.{name}", strict)
                                  if name in both else sub)
                    if both[name] is None:
                        return None
                out[key] = both
            elif key == "required":
                out[key] = list(dict.fromkeys([*out[key], *value]))
            elif key == "type":
                kinds = _common(_kinds(out[key]), _kinds(value))
                if not kinds:
                    if strict:
                        raise Refused(f"{where} must be both {out[key]} and {value}")
                    return None
                out[key] = kinds[0] if len(kinds) == 1 else kinds
            elif key in ("description", "title", "default", "examples"):
                out[key] = value  # a $ref's own description outranks its target's
            elif key in _LOWER:
                out[key] = max(out[key], value)
            elif key in _UPPER:
                out[key] = min(out[key], value)
            elif out[key] != value:
                if strict:
                    raise Refused(f"{where} has an allOf whose {key}s cannot be combined")
                return None
    return out


def _kinds(kind: Any) -> list[str]:
    return [kind] if isinstance(kind, str) else list(kind) if isinstance(kind, list) else []


def _common(a: list[str], b: list[str]) -> list[str]:
    """The types both allow; an integer is a number."""
    out = [k for k in a if k in b]
    if ("integer" in a and "number" in b) or ("number" in a and "integer" in b):
        out.append("integer")
    return list(dict.fromkeys(out))


def _top(schema: dict[str, Any]) -> dict[str, Any]:
    """The top level as the Realtime API wants it: one object, no union, no title."""
    schema.pop("title", None)
    if "allOf" in schema:  # left unmerged by _Inliner: say what conflicts
        schema = _merge([{k: v for k, v in schema.items() if k != "allOf"}, *schema["allOf"]],
                        "arguments") or schema
    kinds = _kinds(schema.get("type", "object"))
    if "object" not in kinds:
        raise Refused(f"its arguments are of type {schema.get('type')!r}, not an object")
    schema["type"] = "object"
    for key in ("enum", "const", "not"):
        if key in schema:
            raise Refused(f"its arguments are limited by {key} at the top level")
    for key in ("anyOf", "oneOf"):
        if key in schema:
            schema = _flatten(schema, schema.pop(key), key)
    return schema


def _flatten(base: dict[str, Any], choices: list[Any], key: str) -> dict[str, Any]:
    """One object for a union of objects: every property any choice has, and as
    required only what every choice requires (the server checks the union itself)."""
    if not all(isinstance(c, dict) and "object" in _kinds(c.get("type", "object"))
               and not any(k in c for k in ("anyOf", "oneOf")) for c in choices):
        raise Refused(f"its arguments are one of several shapes ({key}), not all objects")
    props: dict[str, list[Any]] = {n: [s] for n, s in base.get("properties", {}).items()}
    for choice in choices:
        for name, sub in choice.get("properties", {}).items():
            if sub not in props.setdefault(name, []):
                props[name].append(sub)
    required = set.intersection(*(set(c.get("required", [])) for c in choices))
    base["properties"] = {n: subs[0] if len(subs) == 1 else {"anyOf": subs}
                          for n, subs in props.items()}
    base["required"] = list(dict.fromkeys([*base.get("required", []),
                                           *(n for n in props if n in required)]))
    if not base["required"]:
        del base["required"]
    return base


def _for_realtime(node: Any, where: str) -> None:
    """In place: `items` for every array and `properties` for every object (the API
    refuses either missing); a type it does not know is refused here, with where."""
    if not isinstance(node, dict):
        return
    kinds = _kinds(node.get("type"))
    if node.get("nullable") is True and kinds:  # OpenAPI 3.0's spelling of "or null"
        node["type"] = [*kinds, "null"] if "null" not in kinds else node["type"]
        del node["nullable"]
    if "type" in node and (not kinds or any(not isinstance(k, str) or k not in TYPES
                                            for k in kinds)):
        raise Refused(f"{where} has type {node['type']!r}")
    if "array" in kinds:
        if isinstance(node.get("items"), list):  # draft 7 tuples: 2020-12 prefixItems
            node["prefixItems"] = node.pop("items")
            node["items"] = node.pop("additionalItems", {})
        node.setdefault("items", {})
    if "object" in kinds:
        node.setdefault("properties", {})
    for key, value in node.items():
        if key in _ONE:
            _for_realtime(value, f"{where}.{key}")
        elif key in _MANY and isinstance(value, list):
            for i, sub in enumerate(value):
                _for_realtime(sub, f"{where}.{key}[{i}]")
        elif key in _NAMED and isinstance(value, dict):
            for name, sub in value.items():
                _for_realtime(sub, f"{where}.{name}")


# --- checking ------------------------------------------------------------------------

def validate(value: Any, schema: Any, path: str = "") -> None:
    """Raise ArgumentError naming the field if `value` does not fit `schema`.

    Checked: type (one or a list), enum, const, the bounds of numbers, strings, arrays
    and objects, multipleOf, pattern, uniqueItems, properties, required,
    additionalProperties, patternProperties, items, prefixItems, anyOf, oneOf, allOf,
    not. Other keywords (format, if/then/else, ...) are left to the tool itself."""
    where = path or "arguments"
    if schema is True or not isinstance(schema, Mapping):
        if schema is False:
            raise ArgumentError(f"{where} is not allowed", where, wrong_type=True)
        return
    kinds = _kinds(schema.get("type"))
    if kinds and not any(_is(value, k) for k in kinds):
        raise ArgumentError(f"{where} must be {' or '.join(kinds)}", where, wrong_type=True)
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        raise ArgumentError(f"{where} must be one of {schema['enum']}", where,
                            wrong_type=True)
    if "const" in schema and not _same(value, schema["const"]):
        raise ArgumentError(f"{where} must be {schema['const']!r}", where, wrong_type=True)
    if _is(value, "number"):
        _number(value, schema, where)
    elif isinstance(value, str):
        _bounds(len(value), schema, where, "Length", "characters")
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and _search(pattern, value) is False:
            raise ArgumentError(f"{where} must match {pattern}")
    elif isinstance(value, list):
        _array(value, schema, path, where)
    elif isinstance(value, dict):
        _object(value, schema, path)
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            _choices(value, schema[key], key, path, where)
    if "not" in schema:
        try:
            validate(value, schema["not"], path)
        except ArgumentError:
            return
        raise ArgumentError(f"{where} must not be {value!r}")


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind != "boolean":
        return False
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    want = TYPES.get(kind)
    return want is not None and isinstance(value, want)


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, 1 is 1.0."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if _is(a, "number") and _is(b, "number"):
        return bool(a == b)
    return type(a) is type(b) and bool(a == b)


def _search(pattern: str, text: str) -> bool | None:
    try:
        return re.search(pattern, text) is not None
    except re.error:  # an ECMA-262 pattern Python cannot read: the tool checks it
        return None


def _number(value: float, schema: Mapping[str, Any], where: str) -> None:
    for key, bad, words in (("minimum", operator.lt, "at least"),
                            ("maximum", operator.gt, "at most"),
                            ("exclusiveMinimum", operator.le, "more than"),
                            ("exclusiveMaximum", operator.ge, "less than")):
        limit = schema.get(key)
        if _is(limit, "number") and bad(value, limit):
            raise ArgumentError(f"{where} must be {words} {limit}")
    step = schema.get("multipleOf")
    if _is(step, "number") and step > 0:
        if isinstance(step, float):
            quotient = value / step
            off = not math.isfinite(quotient) or int(quotient) != quotient
        else:
            off = bool(value % step)
        if off:
            raise ArgumentError(f"{where} must be a multiple of {step}")


def _bounds(n: int, schema: Mapping[str, Any], where: str, what: str, unit: str) -> None:
    low, high = schema.get(f"min{what}"), schema.get(f"max{what}")
    if isinstance(low, int) and n < low:
        raise ArgumentError(f"{where} must have at least {low} {unit}")
    if isinstance(high, int) and n > high:
        raise ArgumentError(f"{where} must have at most {high} {unit}")


def _array(value: list[Any], schema: Mapping[str, Any], path: str, where: str) -> None:
    _bounds(len(value), schema, where, "Items", "items")
    prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
    for i, item in enumerate(value):
        sub = prefix[i] if i < len(prefix) else schema.get("items", True)
        validate(item, sub, f"{where}[{i}]")
    if schema.get("uniqueItems") is True and any(
            _same(a, b) for i, a in enumerate(value) for b in value[i + 1:]):
        raise ArgumentError(f"{where} must not repeat an item")


def _object(value: dict[str, Any], schema: Mapping[str, Any], path: str) -> None:
    prefix = f"{path}." if path else ""
    _bounds(len(value), schema, path or "arguments", "Properties", "keys")
    for key in schema.get("required", []):
        if key not in value:
            raise ArgumentError(f"{prefix}{key} is required")
    props = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    for key, item in value.items():
        matched = False
        if key in props:
            validate(item, props[key], prefix + key)
            matched = True
        for pattern, sub in patterns.items():
            if _search(pattern, key):
                validate(item, sub, prefix + key)
                matched = True
        if not matched and "additionalProperties" in schema:
            if schema["additionalProperties"] is False:
                raise ArgumentError(f"unknown argument {prefix + key!r}")
            validate(item, schema["additionalProperties"], prefix + key)


def _choices(value: Any, choices: list[Any], key: str, path: str, where: str) -> None:
    errors: list[ArgumentError] = []
    for choice in choices:
        try:
            validate(value, choice, path)
        except ArgumentError as e:
            errors.append(e)
    fits = len(choices) - len(errors)
    if key == "allOf" and errors:
        raise errors[0]
    if key == "oneOf" and fits > 1:
        raise ArgumentError(f"{where} fits {fits} of its choices, and must fit one only")
    if fits == 0 and key != "allOf":
        near = [e for e in errors if not (e.wrong_type and e.where == where)]
        if len(near) == 1:  # the one choice of its type: what is wrong inside it
            raise near[0]
        wanted = " or ".join(dict.fromkeys(_describe(c) for c in choices))
        raise ArgumentError(f"{where} must be {wanted}", where, wrong_type=not near)


def _describe(schema: Any) -> str:
    if not isinstance(schema, Mapping):
        return "anything" if schema is True else "nothing"
    if "enum" in schema:
        return f"one of {schema['enum']}"
    if "const" in schema:
        return repr(schema["const"])
    return " or ".join(_kinds(schema.get("type"))) or "as its schema describes"
