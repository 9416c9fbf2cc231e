"""The OpenAPI component schemas, from msgspec itself: what the server validates is what the
document says (`additionalProperties: false`, every limit), with shared parts named once.
"""

from __future__ import annotations

from typing import Any, get_args

import msgspec

from service import models, schemas
from service.config import Settings

REF = "#/components/schemas/{name}"


def ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(name=name)}


# Literal types that several schemas share, each one named component (one enum in a client).
NAMED_ENUMS: dict[str, tuple[str, ...]] = {
    "TurnStatus": get_args(models.TurnStatus),
    "TurnContext": get_args(models.TurnContext),
    "EventType": get_args(models.EventType),
    "DeliveryStatus": get_args(models.DeliveryStatus),
    "ConversationStatus": get_args(models.ConversationStatus),
    "TerminalEventType": get_args(schemas.TerminalEventType),
}
# Types the document needs that no route returns directly.
EXTRA_TYPES: tuple[Any, ...] = (models.ProgressEvent, schemas.WebhookPayload)


def _default(setting: str) -> Any:
    """A setting's default: the limit the document states (operators may change it)."""
    return next(f.default for f in msgspec.structs.fields(Settings) if f.name == setting)


def _structs() -> dict[str, type[msgspec.Struct]]:
    found: dict[str, type[msgspec.Struct]] = {}
    for module in (models, schemas):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, msgspec.Struct):
                found.setdefault(value.__name__, value)
    return found


def component_schemas(names: list[str]) -> dict[str, Any]:
    """msgspec's JSON schemas of the named Structs and what they refer to, named components."""
    structs = _structs()
    unknown = sorted(set(names) - structs.keys())
    if unknown:
        raise RuntimeError(f"OpenAPI components without a Struct in models/schemas: {unknown}")
    types = [structs[name] for name in sorted(names)] + list(EXTRA_TYPES)
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    for schema in components.values():
        schema.pop("title", None)  # the component's name says it
    _mark_date_times(components, types)
    _name_shared_parts(components)
    return dict(sorted(components.items()))


def _mark_date_times(components: dict[str, Any], types: list[Any]) -> None:
    """`format: date-time` on datetime fields (msgspec 0.22 emits a bare string for them)."""
    for info in msgspec.inspect.multi_type_info(types):
        _mark_struct(components, info, set())


def _mark_struct(components: dict[str, Any], info: Any, seen: set[str]) -> None:
    if not isinstance(info, msgspec.inspect.StructType) or info.cls.__name__ in seen:
        return
    seen.add(info.cls.__name__)
    properties = components[info.cls.__name__].get("properties", {})
    for field in info.fields:
        arms = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else (
            field.type,)
        for arm in arms:
            if isinstance(arm, msgspec.inspect.Metadata):
                arm = arm.type
            if isinstance(arm, msgspec.inspect.DateTimeType):
                schema = properties[field.encode_name]
                for target in schema.get("anyOf", [schema]):
                    if target.get("type") == "string":
                        target["format"] = "date-time"
            for inner in _children(arm):
                _mark_struct(components, inner, seen)


def _children(info: Any) -> list[Any]:
    if isinstance(info, msgspec.inspect.StructType):
        return [info]
    if isinstance(info, msgspec.inspect.ListType):
        return _children(info.item_type)
    if isinstance(info, msgspec.inspect.DictType):
        return _children(info.value_type)
    if isinstance(info, msgspec.inspect.UnionType):
        return [c for t in info.types for c in _children(t)]
    return []


def _name_shared_parts(components: dict[str, Any]) -> None:
    """Enums, metadata, output schemas and JSON inputs as named components."""
    enums = {frozenset(values): name for name, values in NAMED_ENUMS.items()}
    for schema in list(components.values()):
        for prop in schema.get("properties", {}).values():
            for arm in [prop, *prop.get("anyOf", [])]:
                name = enums.get(frozenset(arm.get("enum", ())))
                if name and len(arm["enum"]) > 1:
                    arm.clear()
                    arm.update(ref(name))
    for name, values in NAMED_ENUMS.items():
        components[name] = {"type": "string", "enum": list(values)}
    components["Metadata"] = components["ConversationCreate"]["properties"]["metadata"]
    components["Metadata"].pop("default", None)
    components["OutputSchema"] = components["TurnCreate"]["properties"]["output_schema"]
    components["OutputSchema"]["description"] = (
        "What the answer is: text (the default), JSON fitting `json_schema` (an object schema "
        "with properties, at most 3 objects deep), or Parallel's choice (auto)")
    inputs = components["TurnCreate"]["properties"]["input"]["anyOf"]
    components["TurnInput"] = inputs[1]
    inputs[1] = ref("TurnInput")
    inputs[0]["maxLength"] = _default("max_input_chars")
    for owner, fields in {
        "ConversationCreate": ("metadata",), "ConversationUpdate": ("metadata",),
        "TurnCreate": ("metadata", "output_schema"), "Turn": ("metadata", "output_schema"),
        "Conversation": ("metadata",), "ConversationWithSecret": ("metadata",),
    }.items():
        for field in fields:
            target = "Metadata" if field == "metadata" else "OutputSchema"
            components[owner]["properties"][field] = ref(target)
    for owner in ("Turn", "TranscriptTurn"):
        components[owner]["properties"]["input"] = {
            "anyOf": [{"type": "string"}, ref("TurnInput")]}
    # Always sent (null or a value): its default only reads events stored before it existed.
    turn = components["Turn"]
    turn["properties"]["context"].pop("default", None)
    required = turn["required"]
    required.insert(required.index("upstream_may_continue") + 1, "context")
