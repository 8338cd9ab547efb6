"""The structured-output test set: JSON schemas, regular expressions and choice lists a user would
write, each with a short prompt that leads a base model (Gemma 3 270M) towards such output.

Plain data, no torch. Shared by benchmarks/grammar_libraries.py (which library compiles and masks
faster on our vocabulary) and benchmarks/structured_validity.py (does the engine's output parse,
validate and match). `example_instance` makes one valid instance of a schema, deterministically, for
walking a matcher along a real output; a string with a `pattern` takes the schema's `examples[0]`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union


@dataclass(frozen=True)
class JsonCase:
    name: str
    prompt: str
    schema: dict
    max_tokens: int = 256


@dataclass(frozen=True)
class RegexCase:
    name: str
    prompt: str
    pattern: str
    example: str  # a string that fullmatches `pattern`
    max_tokens: int = 32


@dataclass(frozen=True)
class ChoiceCase:
    name: str
    prompt: str
    choices: tuple[str, ...]
    max_tokens: int = 16


@dataclass(frozen=True)
class GrammarCase:
    name: str
    prompt: str
    lark: str  # llguidance's Lark dialect
    check: str  # a Python regular expression for the same language, to check outputs with
    max_tokens: int = 48


Case = Union[JsonCase, RegexCase, ChoiceCase, GrammarCase]


def _obj(properties: dict, required=None, **extra) -> dict:
    """An object schema; `required` None means every property is required."""
    schema = {"type": "object", "properties": properties,
              "required": list(properties) if required is None else list(required)}
    schema.update(extra)
    return schema


STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT = {"type": "integer"}
NUM = {"type": "number"}
DATE = {"type": "string", "format": "date"}
DATE_TIME = {"type": "string", "format": "date-time"}
EMAIL = {"type": "string", "format": "email"}


def _str_list(lo: int, hi: int, item: Optional[dict] = None) -> dict:
    return {"type": "array", "items": item or STR, "minItems": lo, "maxItems": hi}


JSON_CASES: tuple[JsonCase, ...] = (
    JsonCase("book", "A JSON record of a book:\n", _obj({
        "title": STR, "author": STR, "year": {"type": "integer", "minimum": 1450, "maximum": 2025},
        "isbn": STR}, required=["title", "author", "year"])),
    JsonCase("person", "A JSON record of a person:\n", _obj({
        "name": STR, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "email": EMAIL},
        required=["name", "age"])),
    JsonCase("postal_address", "The office's postal address as JSON:\n", _obj({
        "street": STR, "city": STR,
        "postal_code": {"type": "string", "pattern": "^[0-9]{5}$", "examples": ["94103"]},
        "country": {"enum": ["US", "CA", "MX"]}}, additionalProperties=False)),
    JsonCase("product", "Product catalogue entry in JSON:\n", _obj({
        "id": {"type": "integer", "minimum": 1}, "name": STR, "price": {"type": "number", "minimum": 0},
        "in_stock": BOOL, "tags": _str_list(0, 5)}, required=["id", "name", "price", "in_stock"])),
    JsonCase("weather", "Today's weather in Paris, as JSON:\n", _obj({
        "city": STR, "temperature_c": {"type": "number", "minimum": -90, "maximum": 60},
        "conditions": {"type": "string", "enum": ["sunny", "cloudy", "rain", "snow", "fog"]},
        "humidity_percent": {"type": "integer", "minimum": 0, "maximum": 100}})),
    JsonCase("movie", "A JSON description of a famous movie:\n", _obj({
        "title": STR, "year": {"type": "integer", "minimum": 1888, "maximum": 2030},
        "genres": _str_list(1, 3, {"enum": ["action", "comedy", "drama", "horror", "science fiction",
                                            "romance", "documentary", "animation"]}),
        "rating": {"type": "number", "minimum": 0, "maximum": 10}})),
    JsonCase("recipe", "A simple pancake recipe in JSON:\n", _obj({
        "name": STR, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
        "ingredients": {"type": "array", "minItems": 2, "maxItems": 6, "items": _obj({
            "item": STR, "quantity": {"type": "number", "exclusiveMinimum": 0},
            "unit": {"enum": ["g", "ml", "cup", "tbsp", "tsp", "piece"]}})},
        "steps": _str_list(1, 5)}), max_tokens=384),
    JsonCase("order_refs", "An online shop order as JSON:\n", {
        "$defs": {
            "customer": _obj({"name": STR, "email": EMAIL}),
            "line_item": _obj({"sku": STR, "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                               "unit_price": {"type": "number", "minimum": 0}}),
        },
        **_obj({"order_id": STR, "customer": {"$ref": "#/$defs/customer"},
                "items": {"type": "array", "items": {"$ref": "#/$defs/line_item"}, "minItems": 1, "maxItems": 4}}),
    }, max_tokens=320),
    JsonCase("event", "Conference event details in JSON:\n", _obj({
        "name": STR, "date": DATE, "city": STR,
        "attendees": {"type": "integer", "minimum": 0}}, required=["name", "date"])),
    JsonCase("user_account", "A new user account, JSON:\n", _obj({
        "username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,15}$", "examples": ["jdoe_42"]},
        "email": EMAIL, "is_admin": BOOL, "created_at": DATE_TIME}, additionalProperties=False)),
    JsonCase("employee_nullable", "Employee directory entry (JSON):\n", _obj({
        "name": STR, "title": STR, "manager": {"type": ["string", "null"]},
        "middle_name": {"type": ["string", "null"]}, "remote": BOOL})),
    JsonCase("payment_anyof", "The payment method of the order, as JSON:\n", {"anyOf": [
        _obj({"method": {"const": "card"}, "brand": {"enum": ["visa", "mastercard", "amex"]},
              "last4": {"type": "string", "pattern": "^[0-9]{4}$", "examples": ["4242"]}}),
        _obj({"method": {"const": "bank_transfer"}, "iban": STR}),
        _obj({"method": {"const": "cash"}}),
    ]}),
    JsonCase("geo_point", "The coordinates of the Eiffel Tower in JSON:\n", _obj({
        "latitude": {"type": "number", "minimum": -90, "maximum": 90},
        "longitude": {"type": "number", "minimum": -180, "maximum": 180}})),
    JsonCase("rgb_color", "The color orange as a JSON RGB value:\n", _obj({
        "r": {"type": "integer", "minimum": 0, "maximum": 255},
        "g": {"type": "integer", "minimum": 0, "maximum": 255},
        "b": {"type": "integer", "minimum": 0, "maximum": 255}}, additionalProperties=False)),
    JsonCase("todo_list", "My to-do list for tomorrow as a JSON array:\n", {
        "type": "array", "minItems": 3, "maxItems": 3, "items": _obj({
            "task": STR, "done": BOOL, "priority": {"enum": ["low", "medium", "high"]}})}),
    JsonCase("sentiment", "Review: The battery died after two days and support never answered.\n"
             "Analysis as JSON:\n", _obj({
                 "sentiment": {"enum": ["positive", "negative", "neutral"]},
                 "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    JsonCase("entities", "Text: Marie Curie worked in Paris at the University of Paris.\n"
             "Named entities as JSON:\n", _obj({
                 "people": _str_list(0, 5), "places": _str_list(0, 5), "organizations": _str_list(0, 5)})),
    JsonCase("category_tree", "A product category tree in JSON:\n", {
        "$defs": {"node": _obj({"name": STR, "children": {
            "type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 3}}, required=["name"])},
        "$ref": "#/$defs/node"}, max_tokens=384),
    JsonCase("invoice", "Invoice data extracted as JSON:\n", _obj({
        "invoice_number": STR, "issued": DATE, "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]},
        "lines": {"type": "array", "minItems": 1, "maxItems": 5,
                  "items": _obj({"description": STR, "amount": {"type": "number", "minimum": 0}})},
        "total": {"type": "number", "minimum": 0}, "paid": BOOL}), max_tokens=320),
    JsonCase("flight", "Flight booking (JSON):\n", _obj({
        "flight_number": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{1,4}$", "examples": ["LH454"]},
        "from": {"type": "string", "pattern": "^[A-Z]{3}$", "examples": ["SFO"]},
        "to": {"type": "string", "pattern": "^[A-Z]{3}$", "examples": ["FRA"]},
        "departure": DATE_TIME, "seats_available": {"type": "integer", "minimum": 0}})),
    JsonCase("server_config", "config.json for the web server:\n", _obj({
        "host": STR, "port": {"type": "integer", "minimum": 1, "maximum": 65535}, "tls": BOOL,
        "log_level": {"enum": ["debug", "info", "warning", "error"]},
        "timeout_s": {"type": "number", "minimum": 0, "maximum": 3600}},
        required=["host", "port"], additionalProperties=False)),
    JsonCase("student_grades", "A student's grades this term, as JSON:\n", _obj({
        "student": STR, "grades": _str_list(3, 5, {"type": "integer", "minimum": 0, "maximum": 100}),
        "average": {"type": "number", "minimum": 0, "maximum": 100}})),
    JsonCase("api_error", "HTTP 404 response body (JSON):\n", _obj({
        "error": _obj({"code": {"type": "integer", "minimum": 400, "maximum": 599}, "message": STR,
                       "details": STR}, required=["code", "message"])})),
    JsonCase("company", "Company profile in JSON format:\n", _obj({
        "name": STR, "founded": {"type": "integer", "minimum": 1600, "maximum": 2025},
        "employees": {"type": "integer", "minimum": 1},
        "headquarters": _obj({"city": STR, "country": STR}),
        "ceo": _obj({"name": STR, "since": {"type": "integer", "minimum": 1900, "maximum": 2025}})})),
    JsonCase("song", "Now playing, as JSON:\n", _obj({
        "title": STR, "artist": STR, "album": {"type": ["string", "null"]},
        "duration_seconds": {"type": "integer", "minimum": 30, "maximum": 900}, "explicit": BOOL})),
    JsonCase("calendar", "Next week's calendar as JSON:\n", _obj({
        "events": {"type": "array", "minItems": 1, "maxItems": 4,
                   "items": _obj({"title": STR, "date": DATE, "all_day": BOOL})}}), max_tokens=320),
    JsonCase("color_enum", "Favourite primary color, as a JSON string:\n",
             {"type": "string", "enum": ["red", "green", "blue"]}, max_tokens=16),
    JsonCase("rating_integer", "How good was the service, from 1 to 10? JSON answer:\n",
             {"type": "integer", "minimum": 1, "maximum": 10}, max_tokens=16),
    JsonCase("status_const", "Health check response in JSON:\n", _obj({
        "version": {"const": "1.0"}, "status": {"enum": ["ok", "degraded", "down"]},
        "uptime_s": {"type": "integer", "minimum": 0}})),
    JsonCase("tool_call", "Call a tool to answer 'What is the weather in Rome?'. Tool call as JSON:\n", {
        "anyOf": [
            _obj({"name": {"const": "get_weather"},
                  "arguments": _obj({"city": STR, "unit": {"enum": ["celsius", "fahrenheit"]}},
                                    additionalProperties=False)}, additionalProperties=False),
            _obj({"name": {"const": "search_web"},
                  "arguments": _obj({"query": STR, "max_results": {"type": "integer", "minimum": 1,
                                                                   "maximum": 10}},
                                    required=["query"], additionalProperties=False)},
                 additionalProperties=False),
        ]}),
    JsonCase("uuid_record", "Audit log record with its UUID, in JSON:\n", _obj({
        "id": {"type": "string", "format": "uuid"}, "actor": STR,
        "action": {"enum": ["create", "update", "delete"]}})),
    JsonCase("contact_card", "Contact card in JSON:\n", _obj({
        "name": STR,
        "phones": {"type": "array", "minItems": 1, "maxItems": 3, "items": _obj({
            "kind": {"enum": ["mobile", "home", "work"]},
            "number": {"type": "string", "pattern": "^\\+?[0-9 ]{7,15}$", "examples": ["+1 415 555 0100"]}})},
        "emails": _str_list(0, 2, EMAIL)}, required=["name", "phones"])),
    JsonCase("matrix", "A 3x3 matrix of small integers as JSON:\n", {
        "type": "array", "minItems": 3, "maxItems": 3,
        "items": {"type": "array", "minItems": 3, "maxItems": 3,
                  "items": {"type": "integer", "minimum": -9, "maximum": 9}}}),
    JsonCase("feature_flags", "Feature flags for the mobile app (JSON):\n", _obj({
        "dark_mode": BOOL, "beta_features": BOOL, "analytics": BOOL, "push_notifications": BOOL},
        additionalProperties=False)),
    JsonCase("word_counts", "Word counts of 'the cat and the hat' as a JSON object:\n", {
        "type": "object", "additionalProperties": {"type": "integer", "minimum": 1},
        "minProperties": 1, "maxProperties": 6}),
    JsonCase("shape_oneof", "A geometric shape as JSON:\n", {"oneOf": [
        _obj({"kind": {"const": "circle"}, "radius": {"type": "number", "exclusiveMinimum": 0}}),
        _obj({"kind": {"const": "rectangle"}, "width": {"type": "number", "exclusiveMinimum": 0},
              "height": {"type": "number", "exclusiveMinimum": 0}}),
    ]}),
    JsonCase("multiple_of", "Packing list for the shipment in JSON:\n", _obj({
        "boxes": {"type": "integer", "minimum": 1, "maximum": 100},
        "bottles": {"type": "integer", "multipleOf": 6, "minimum": 0, "maximum": 120}})),
    JsonCase("tweet", "A tweet announcing our launch, as JSON:\n", _obj({
        "text": {"type": "string", "minLength": 1, "maxLength": 280},
        "hashtags": _str_list(0, 4, {"type": "string", "pattern": "^#[A-Za-z0-9_]{1,30}$",
                                     "examples": ["#launch"]})}), max_tokens=320),
    JsonCase("library", "Books on my shelf, as a JSON catalogue:\n", {
        "$defs": {"book": _obj({"title": STR, "author": STR,
                                "year": {"type": "integer", "minimum": 1450, "maximum": 2025}})},
        **_obj({"owner": STR, "books": {"type": "array", "items": {"$ref": "#/$defs/book"},
                                        "minItems": 1, "maxItems": 3}})}, max_tokens=320),
    JsonCase("log_entry", "Application log entry (JSON):\n", _obj({
        "timestamp": DATE_TIME, "level": {"enum": ["DEBUG", "INFO", "WARN", "ERROR"]}, "message": STR,
        "context": {"type": "object", "additionalProperties": STR, "maxProperties": 3}},
        required=["timestamp", "level", "message"])),
    JsonCase("quiz", "A multiple-choice geography quiz question in JSON:\n", _obj({
        "question": STR, "options": _str_list(4, 4), "answer_index": {"type": "integer", "minimum": 0,
                                                                       "maximum": 3}})),
    JsonCase("translation", "Translate 'good morning' to Spanish. JSON:\n", _obj({
        "source_language": {"enum": ["en", "es", "fr", "de", "it"]},
        "target_language": {"enum": ["en", "es", "fr", "de", "it"]}, "text": STR, "translation": STR})),
    JsonCase("discount_exclusive", "Promotion rule in JSON:\n", _obj({
        "code": {"type": "string", "minLength": 3, "maxLength": 12},
        "percent_off": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
        "expires": DATE})),
    JsonCase("vehicle_allof", "Vehicle listing, JSON:\n", {"allOf": [
        _obj({"make": STR, "model": STR}),
        _obj({"year": {"type": "integer", "minimum": 1950, "maximum": 2026},
              "mileage_km": {"type": "integer", "minimum": 0}}, required=["year"]),
    ]}),
    # What pydantic writes for `class Meeting(BaseModel)` with an Optional field and a nested model
    # (the OpenAI SDK's `parse` sends this shape): titles, $defs, anyOf with null, a null default.
    JsonCase("pydantic_meeting", "Meeting notes summary as JSON:\n", {
        "$defs": {"Attendee": {"properties": {"name": {"title": "Name", "type": "string"},
                                              "role": {"anyOf": [{"type": "string"}, {"type": "null"}],
                                                       "default": None, "title": "Role"}},
                               "required": ["name"], "title": "Attendee", "type": "object"}},
        "properties": {"topic": {"title": "Topic", "type": "string"},
                       "attendees": {"items": {"$ref": "#/$defs/Attendee"}, "title": "Attendees",
                                     "type": "array", "maxItems": 4},
                       "decisions": {"items": {"type": "string"}, "title": "Decisions", "type": "array",
                                     "maxItems": 4},
                       "follow_up": {"anyOf": [{"format": "date", "type": "string"}, {"type": "null"}],
                                     "default": None, "title": "Follow Up"}},
        "required": ["topic", "attendees", "decisions"], "title": "Meeting", "type": "object"},
        max_tokens=384),
    JsonCase("website", "Website metadata in JSON:\n", _obj({
        "url": {"type": "string", "format": "uri"}, "title": STR,
        "language": {"type": "string", "pattern": "^[a-z]{2}$", "examples": ["en"]}})),
)

REGEX_CASES: tuple[RegexCase, ...] = (
    RegexCase("iso_date", "The Apollo 11 moon landing happened on (YYYY-MM-DD): ",
              r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", "1969-07-20"),
    RegexCase("us_phone", "Call our support line at ", r"\(\d{3}\) \d{3}-\d{4}", "(415) 555-0100"),
    RegexCase("ipv4", "The router's IP address is ",
              r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)", "192.168.1.1"),
    RegexCase("identifier", "A good Python variable name for the user's age: ",
              r"[a-z_][a-z0-9_]{0,30}", "user_age"),
    RegexCase("email", "Send your questions to ", r"[a-z0-9._]{1,20}@[a-z0-9]{1,20}\.(com|org|net)",
              "help@example.com"),
    RegexCase("time_24h", "The train leaves at (24-hour clock) ", r"([01]\d|2[0-3]):[0-5]\d", "18:45"),
    RegexCase("hex_color", "The hex code of pure red is ", r"#[0-9A-Fa-f]{6}", "#FF0000"),
    RegexCase("semver", "The latest release of the library is version ", r"\d{1,3}\.\d{1,3}\.\d{1,3}",
              "2.10.1"),
    RegexCase("us_zip", "The ZIP code of the White House is ", r"\d{5}(-\d{4})?", "20500"),
    RegexCase("yes_no_sentence", "Is water wet? Answer: ", r"(Yes|No), because [a-z ,]{1,60}\.",
              "Yes, because it is a liquid.", max_tokens=48),
    RegexCase("price", "The coffee costs ", r"\$\d{1,3}\.\d{2}", "$3.50"),
    RegexCase("uppercase_code", "The airport code of London Heathrow is ", r"[A-Z]{3}", "LHR"),
)

CHOICE_CASES: tuple[ChoiceCase, ...] = (
    ChoiceCase("review_sentiment", "Review: Great food, terrible service.\nSentiment: ", ("positive", "negative", "mixed")),
    ChoiceCase("yes_no", "Question: Is the Pacific the largest ocean?\nAnswer: ", ("yes", "no")),
    ChoiceCase("capital", "The capital of Australia is ", ("Sydney", "Melbourne", "Canberra", "Perth")),
    ChoiceCase("weekday", "The day after Friday is ", ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                                                     "Saturday", "Sunday")),
    ChoiceCase("language", "Bonjour, comment allez-vous? This sentence is in ",
               ("English", "French", "German", "Spanish", "Italian")),
    ChoiceCase("animal_class", "A dolphin is a ", ("mammal", "fish", "bird", "reptile", "amphibian")),
    ChoiceCase("shirt_size", "Shirt size for a tall adult: ", ("XS", "S", "M", "L", "XL", "XXL")),
    ChoiceCase("boolean", "2 + 2 = 4 is ", ("true", "false")),
    ChoiceCase("http_method", "To create a new resource in a REST API, send a request with method ",
               ("GET", "POST", "PUT", "DELETE", "PATCH")),
    ChoiceCase("planet", "The largest planet in the solar system is ",
               ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")),
    ChoiceCase("priority", "Ticket: The production database is down.\nPriority: ",
               ("low", "medium", "high", "critical")),
    ChoiceCase("multiword", "The best way to travel from Paris to London is ",
               ("by train", "by plane", "by car", "by ferry and bus")),
)

# A few Lark grammars whose languages are regular, so a Python regex can check the outputs.
GRAMMAR_CASES: tuple[GrammarCase, ...] = (
    GrammarCase("key_values", "Settings as key=value pairs separated by semicolons: ",
                'start: pair | pair ";" pair | pair ";" pair ";" pair\n'
                'pair: KEY "=" VALUE\nKEY: /[a-z]{1,12}/\nVALUE: /[0-9]{1,4}/\n',
                r"[a-z]{1,12}=[0-9]{1,4}(;[a-z]{1,12}=[0-9]{1,4}){0,2}"),
    GrammarCase("arithmetic", "A simple sum for a child to solve: ",
                'start: NUMBER OP NUMBER " = ?"\nOP: " + " | " - "\nNUMBER: /[1-9][0-9]?/\n',
                r"[1-9][0-9]? (\+|-) [1-9][0-9]? = \?"),
    GrammarCase("sql_select", "SQL query that lists the names of all users: ",
                'start: "SELECT " COLUMNS " FROM " NAME ";"\n'
                'COLUMNS: "*" | NAME | NAME ", " NAME\nNAME: /[a-z_]{1,16}/\n',
                r"SELECT (\*|[a-z_]{1,16}|[a-z_]{1,16}, [a-z_]{1,16}) FROM [a-z_]{1,16};"),
)


def all_cases() -> Iterator[tuple[str, Case]]:
    """Every case as (kind, case), kind one of "json", "regex", "choice", "grammar"."""
    for case in JSON_CASES:
        yield "json", case
    for case in REGEX_CASES:
        yield "regex", case
    for case in CHOICE_CASES:
        yield "choice", case
    for case in GRAMMAR_CASES:
        yield "grammar", case

# Names are the keys of the benchmarks' results: unique across kinds.
assert len({c.name for _, c in all_cases()}) == len(list(all_cases()))


def schema_text(case: JsonCase) -> str:
    """The case's schema as JSON text, its properties in the order written (the order of the output)."""
    return json.dumps(case.schema)


# --- one valid instance per schema ------------------------------------------------------------------

_FORMAT_EXAMPLES = {"date": "2024-05-17", "date-time": "2024-05-17T09:30:00Z", "time": "09:30:00Z",
                    "email": "ada@example.com", "uuid": "3f2b8c1e-9d4a-4e6f-8b7c-1a2d3e4f5a6b",
                    "uri": "https://example.com/docs", "ipv4": "10.0.0.1", "hostname": "example.com"}


def example_instance(schema: Any, root: Optional[dict] = None, depth: int = 0) -> Any:
    """A valid instance of `schema`, the same every time: every property in schema order (each
    library's JSON grammar keeps that order), arrays at their lower bound or 2, numbers at a bound
    or a small value inside, the first branch of anyOf/oneOf, non-null types first."""
    root = schema if root is None else root
    if schema is True or schema == {}:
        return "x"
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            if part:
                target = target[part]
        return example_instance(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][min(1, len(schema["enum"]) - 1)]
    if "anyOf" in schema or "oneOf" in schema:
        return example_instance((schema.get("anyOf") or schema["oneOf"])[0], root, depth)
    if "allOf" in schema:
        merged: dict = {}
        for part in schema["allOf"]:
            merged.update(example_instance(part, root, depth))
        return merged
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        props = schema.get("properties", {})
        if props:
            return {name: example_instance(sub, root, depth + 1) for name, sub in props.items()
                    if depth < 3 or name in schema.get("required", ())}
        extra = schema.get("additionalProperties", {})
        count = max(schema.get("minProperties", 0), min(2, schema.get("maxProperties", 2)))
        return {f"key{i}": example_instance(extra, root, depth + 1) for i in range(count)}
    if kind == "array":
        count = schema.get("minItems", 0) if depth >= 3 else max(schema.get("minItems", 0),
                                                                 min(2, schema.get("maxItems", 2)))
        return [example_instance(schema.get("items", {}), root, depth + 1) for _ in range(count)]
    if kind == "string":
        if "pattern" in schema:
            return schema["examples"][0]
        if "format" in schema:
            return _FORMAT_EXAMPLES[schema["format"]]
        text = "example text"
        return text[:schema.get("maxLength", len(text))].ljust(schema.get("minLength", 0), "x")
    if kind in ("integer", "number"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum", 0) + (1 if "exclusiveMinimum" in schema else 0))
        hi = schema.get("maximum", schema.get("exclusiveMaximum", lo + 100) - (1 if "exclusiveMaximum" in schema else 0))
        value = min(max(lo, 42), hi)
        step = schema.get("multipleOf", 1)
        value = (value // step) * step if value // step * step >= lo else value + step - value % step
        return value if kind == "integer" else value + 0.5 if value + 0.5 <= hi else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    raise ValueError(f"no example for schema {schema!r}")
