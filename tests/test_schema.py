"""Tools' argument schemas: what MCP servers emit made into what the Realtime API takes
(speakerd/tools/schema.py `to_parameters`), and the model's arguments checked against
it (`validate`), the latter against the `jsonschema` package on random schemas."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speakerd.tools import schema as schemamod
from speakerd.tools.schema import ArgumentError, to_parameters, validate

from .mcp_servers import realtime_refuses

STRING = {"type": "string"}
NULL = {"type": "null"}


def offered(schema: dict) -> dict:
    out = to_parameters(schema)
    assert isinstance(out, dict), out
    assert realtime_refuses(out) == [], realtime_refuses(out)
    return out


class TestOffered:
    """What servers emit passes through as the API takes it, unchanged where it can be."""

    @pytest.mark.parametrize("prop", [
        {"type": ["string", "null"]},
        {"anyOf": [{"type": "array", "items": STRING}, NULL], "default": None,
         "title": "Domain"},
        {"oneOf": [{"type": "integer", "minimum": 0}, NULL]},
        {"type": "string", "enum": ["light", "switch", "fan"], "description": "Which"},
        {"type": "number", "default": 10, "minimum": 1, "maximum": 10},
        {"type": "string", "format": "uri", "default": "https://example.org/"},
        {"type": "object", "properties": {"red": {"type": "integer"}}, "required": ["red"],
         "additionalProperties": False},
        {"type": "object", "properties": {}, "additionalProperties": {"type": "number"}},
        {"type": "array", "items": {"type": "object", "properties": {
            "name": STRING, "observations": {"type": "array", "items": STRING}},
            "required": ["name"]}, "minItems": 1},
    ])
    def test_what_servers_emit_passes_as_it_is(self, prop):
        schema = {"type": "object", "properties": {"x": prop}, "required": ["x"]}
        assert offered(schema) == schema

    def test_the_top_level_loses_only_what_names_the_document(self):
        schema = {"$schema": "http://json-schema.org/draft-07/schema#", "$id": "urn:x",
                  "title": "HassTurnOffArguments", "type": "object",
                  "properties": {"name": {"title": "Name", "type": "string"}}}
        assert offered(schema) == {"type": "object",
                                   "properties": {"name": {"title": "Name", "type": "string"}}}

    def test_an_array_gets_items_and_an_object_properties_as_the_api_requires(self):
        assert offered({"properties": {"paths": {"type": "array"},
                                       "meta": {"type": ["object", "null"]},
                                       "pair": {"type": "array", "items": [STRING, NULL],
                                                "additionalItems": False}}}) == {
            "type": "object", "properties": {
                "paths": {"type": "array", "items": {}},
                "meta": {"type": ["object", "null"], "properties": {}},
                "pair": {"type": "array", "prefixItems": [STRING, NULL], "items": False}}}
        assert offered({"type": "object"}) == {"type": "object", "properties": {}}

    def test_openapi_nullable_becomes_a_null_type(self):
        assert offered({"type": "object", "properties": {"x": {
            "type": "string", "nullable": True}}})["properties"]["x"] == {
            "type": ["string", "null"]}

    def test_refs_are_written_out_in_place_with_their_own_description(self):
        color = {"type": "object", "properties": {"red": {"type": "integer"}},
                 "required": ["red"]}
        schema = {"type": "object", "$defs": {"Color": color}, "properties": {
            "fill": {"$ref": "#/$defs/Color", "description": "Inside"},
            "line": {"anyOf": [{"$ref": "#/$defs/Color"}, NULL], "default": None},
            "old": {"$ref": "#/definitions/Old"}},
            "definitions": {"Old": STRING}}
        assert offered(schema) == {"type": "object", "properties": {
            "fill": {**color, "description": "Inside"},
            "line": {"anyOf": [color, NULL], "default": None},
            "old": STRING}}

    def test_a_whole_model_behind_a_ref_and_an_allof(self):
        schema = {"$ref": "#/$defs/Args", "$defs": {"Args": {"type": "object", "allOf": [
            {"properties": {"a": STRING}, "required": ["a"]},
            {"properties": {"b": {"type": "number", "minimum": 0}}}]}}}
        assert offered(schema) == {"type": "object", "properties": {
            "a": STRING, "b": {"type": "number", "minimum": 0}}, "required": ["a"]}

    def test_a_ref_used_twice_is_no_recursion(self):
        leaf = {"type": "object", "properties": {"v": STRING}}
        schema = {"type": "object", "$defs": {"Leaf": leaf, "Pair": {
            "type": "object", "properties": {"l": {"$ref": "#/$defs/Leaf"},
                                             "r": {"$ref": "#/$defs/Leaf"}}}},
                  "properties": {"p": {"$ref": "#/$defs/Pair"}, "q": {"$ref": "#/$defs/Pair"}}}
        pair = {"type": "object", "properties": {"l": leaf, "r": leaf}}
        assert offered(schema) == {"type": "object", "properties": {"p": pair, "q": pair}}

    def test_a_union_of_objects_at_the_top_is_offered_as_one_object(self):
        # Home Assistant's HassStartTimer: a duration, or hours/minutes/seconds.
        schema = {"anyOf": [
            {"type": "object", "properties": {"duration": STRING, "name": STRING},
             "required": ["duration"]},
            {"type": "object", "properties": {"minutes": {"type": "integer"}, "name": STRING,
                                              "duration": {"type": "integer"}}}]}
        assert offered(schema) == {"type": "object", "properties": {
            "duration": {"anyOf": [STRING, {"type": "integer"}]}, "name": STRING,
            "minutes": {"type": "integer"}}}

    @pytest.mark.parametrize(("schema", "why"), [
        ({"type": "array", "items": STRING},
         "its arguments are of type 'array', not an object"),
        ("x", "its input schema is not an object"),
        ({"type": "object", "properties": {"node": {"$ref": "#/$defs/Node"}}, "$defs": {
            "Node": {"type": "object", "properties": {"children": {
                "type": "array", "items": {"$ref": "#/$defs/Node"}}}}}},
         "arguments.node.children.items refers back to #/$defs/Node, which holds it: a "
         "recursive schema cannot be written out"),
        ({"type": "object", "properties": {"again": {"$ref": "#"}}},
         "arguments.again refers back to #, which holds it: a recursive schema cannot be "
         "written out"),
        ({"type": "object", "properties": {"x": {"$ref": "https://example.org/x.json"}}},
         "arguments.x uses $ref 'https://example.org/x.json', outside its own schema"),
        ({"type": "object", "properties": {"x": {"$ref": "#/$defs/Gone"}}},
         "arguments.x uses $ref '#/$defs/Gone', which is not in its schema"),
        ({"type": "object", "properties": {"x": {"type": "array", "items": {"type": "date"}}}},
         "arguments.x.items has type 'date'"),
        ({"anyOf": [{"type": "object"}, STRING]},
         "its arguments are one of several shapes (anyOf), not all objects"),
        ({"type": "object", "allOf": [{"properties": {"a": STRING}},
                                      {"properties": {"a": {"type": "integer"}}}]},
         "arguments.a must be both string and integer"),
    ])
    def test_what_cannot_be_offered_says_why(self, schema, why):
        assert to_parameters(schema) == why

    def test_a_schema_that_blows_up_when_written_out_is_refused(self):
        defs = {f"L{i}": {"type": "object", "properties": {
            "a": {"$ref": f"#/$defs/L{i + 1}"}, "b": {"$ref": f"#/$defs/L{i + 1}"}}}
            for i in range(20)}
        defs["L20"] = STRING
        assert to_parameters({"type": "object", "$defs": defs, "properties": {
            "x": {"$ref": "#/$defs/L0"}}}) == (
            f"its schema has over {schemamod.MAX_PARTS} parts once its $refs are written out")

    def test_the_input_is_left_as_it_was(self):
        schema = {"type": "object", "$defs": {"A": {"type": "array"}},
                  "properties": {"a": {"$ref": "#/$defs/A"}}}
        before = json.dumps(schema)
        offered(schema)
        assert json.dumps(schema) == before


HASS_TURN_OFF = offered({"type": "object", "properties": {
    "name": {"type": "string", "default": ""}, "area": {"type": "string", "default": ""},
    "domain": {"anyOf": [{"type": "array", "items": STRING}, NULL], "default": None}}})


class TestArguments:
    """The model's arguments, checked before the call; the error names the field."""

    @pytest.mark.parametrize("args", [
        {}, {"domain": None}, {"domain": ["light", "switch"]}, {"name": "kitchen lights"}])
    def test_what_fits_passes(self, args):
        validate(args, HASS_TURN_OFF)

    @pytest.mark.parametrize(("args", "schema", "why"), [
        ({"domain": "light"}, HASS_TURN_OFF, "domain must be array or null"),
        ({"domain": ["light", 2]}, HASS_TURN_OFF, "domain[1] must be string"),
        ({"name": None}, HASS_TURN_OFF, "name must be string"),
        ({"n": True}, {"properties": {"n": {"type": "integer"}}}, "n must be integer"),
        ({"n": 2.5}, {"properties": {"n": {"type": "integer"}}}, "n must be integer"),
        ({"n": 7}, {"properties": {"n": {"type": "integer", "multipleOf": 5}}},
         "n must be a multiple of 5"),
        ({"n": 0}, {"properties": {"n": {"exclusiveMinimum": 0}}}, "n must be more than 0"),
        ({"c": "red"}, {"properties": {"c": {"enum": ["on", "off"]}}},
         "c must be one of ['on', 'off']"),
        ({"c": 1}, {"properties": {"c": {"enum": [True, None]}}},
         "c must be one of [True, None]"),
        ({"s": ""}, {"properties": {"s": {"minLength": 1}}},
         "s must have at least 1 characters"),
        ({"s": "7pm"}, {"properties": {"s": {"pattern": "^[0-2][0-9]:[0-5][0-9]$"}}},
         "s must match ^[0-2][0-9]:[0-5][0-9]$"),
        ({"f": []}, {"properties": {"f": {"type": "array", "minItems": 1}}},
         "f must have at least 1 items"),
        ({"f": [1, 1.0]}, {"properties": {"f": {"uniqueItems": True}}},
         "f must not repeat an item"),
        ({"e": [{"name": "kitchen"}]}, {"properties": {"e": {"type": "array", "items": {
            "type": "object", "properties": {"name": STRING}, "required": ["name", "type"]}}}},
         "e[0].type is required"),
        ({"m": {"x": "1"}}, {"properties": {"m": {"additionalProperties": {"type": "number"}}}},
         "m.x must be number"),
        ({"zone": "UTC"}, {"properties": {}, "additionalProperties": False},
         "unknown argument 'zone'"),
        ({"t": 5}, {"properties": {"t": {"oneOf": [{"type": "integer"}, {"minimum": 0}]}}},
         "t fits 2 of its choices, and must fit one only"),
        ({"t": "x"}, {"properties": {"t": {"not": STRING}}}, "t must not be 'x'"),
        ({"t": 1}, {"properties": {"t": False}}, "t is not allowed"),
    ])
    def test_what_does_not_fit_says_which_field_and_why(self, args, schema, why):
        with pytest.raises(ArgumentError) as e:
            validate(args, schema)
        assert str(e.value) == why


# --- the checker against jsonschema, on random schemas and values -------------------------

KEYS = ("a", "b", "c")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-20, 20) | st.sampled_from([0.5, -1.5, 2.0, 1e20])
    | st.sampled_from(["", "a", "ab", "7pm", "12:30", "light"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner,
                                                               max_size=3),
    max_leaves=8)
TYPE_NAMES = ["string", "integer", "number", "boolean", "object", "array", "null"]


def _leaf() -> st.SearchStrategy[dict]:
    kind = st.sampled_from(TYPE_NAMES) | st.lists(st.sampled_from(TYPE_NAMES), min_size=1,
                                                  max_size=3, unique=True)
    return st.one_of(
        st.builds(lambda k: {"type": k}, kind),
        st.builds(lambda e: {"enum": e}, st.lists(json_values, min_size=1, max_size=3)),
        st.builds(lambda c: {"const": c}, json_values),
        st.fixed_dictionaries({}, optional={
            "minimum": st.integers(-5, 5), "maximum": st.integers(-5, 5),
            "exclusiveMinimum": st.integers(-5, 5), "exclusiveMaximum": st.integers(-5, 5),
            "multipleOf": st.sampled_from([2, 3, 0.5])}),
        st.fixed_dictionaries({}, optional={
            "minLength": st.integers(0, 3), "maxLength": st.integers(0, 3),
            "pattern": st.sampled_from(["^a", "[0-9]", "^[0-2][0-9]:[0-5][0-9]$"]),
            "minItems": st.integers(0, 2), "maxItems": st.integers(0, 2),
            "uniqueItems": st.booleans(), "minProperties": st.integers(0, 2),
            "maxProperties": st.integers(0, 2)}),
        st.just(True), st.just(False))


def _compound(inner: st.SearchStrategy) -> st.SearchStrategy[dict]:
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("array")}, optional={
            "items": inner, "prefixItems": st.lists(inner, max_size=2)}),
        st.fixed_dictionaries({"type": st.sampled_from(["object", ["object", "null"]])},
                              optional={
            "properties": st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
            "required": st.lists(st.sampled_from(KEYS), max_size=2, unique=True),
            "additionalProperties": inner,
            "patternProperties": st.dictionaries(st.sampled_from(["^a", "c$"]), inner,
                                                 max_size=1)}),
        st.builds(lambda k, c: {k: c}, st.sampled_from(["anyOf", "oneOf", "allOf"]),
                  st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda n: {"not": n}, inner))


schemas = st.recursive(_leaf(), _compound, max_leaves=6)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas, value=json_values)
def test_the_checker_agrees_with_jsonschema(schema, value):
    expected = jsonschema.Draft202012Validator(schema).is_valid(value)
    try:
        validate(value, schema)
        got = True
    except ArgumentError:
        got = False
    assert got == expected, (schema, value)
