"""Attribute paths: gjson syntax through gjson-py compiled once, JSONPath through jsonpath-ng."""

from __future__ import annotations

import random
import timeit

import gjson
import pytest
from gjson import GJSONObj

from aistats_engine.rules.paths import CompiledPath, PathError, compile_path

CHAT = {
    "model": "gpt-4o",
    "stream": True,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "what is 2+2?"},
                                     {"type": "image_url", "image_url": {"url": "data:x"}}]},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}},
              {"type": "function", "function": {"name": "lookup"}}],
    "metadata": {"user.id": "u-1", "tags": ["a", "b"], "a*b": 1},
    "temperature": 0.2,
}
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {"content": "Hel", "reasoning_content": None}}],
         "usage": None}
ITEMS = {"items": [{"name": "a", "size": 1, "tags": ["x"]}, {"name": "b", "size": 2},
                   {"size": 3}, "scalar", [1, 2]],
         "friends": [{"first": "Dale", "last": "Murphy", "age": 44, "nets": ["ig", "fb", "tw"]},
                     {"first": "Roger", "last": "Craig", "age": 68, "nets": ["fb", "tw"]},
                     {"first": "Jane", "last": "Murphy", "age": 47, "nets": ["ig", "tw"]}],
         "name": {"first": "Tom", "last": "Anderson"}, "age": 37, "empty": [], "nul": None}
OBJECTS = [CHAT, CHUNK, ITEMS, {}, [], [1, {"a": 2}], "text", 3, None, True,
           {"choices": []}, {"choices": [{"delta": {}}]}, {"messages": "not a list"},
           {"messages": [None, 1, "x"]}, {"a": {"b": {"c": [{"d": 1}, {"d": 2}]}}}]
QUERIES = [
    "messages.@reverse.0.content", "choices.0.delta.content", "choices.0.delta.reasoning_content",
    "messages.#", "messages.#.role", "messages.#.content", "messages.0", "messages.9",
    'messages.#(role=="user").content', 'messages.#(role=="user")#.content',
    'messages.#(role!="user")#.role', 'messages.#(role%"us*")#.content',
    'messages.#(role=="nobody").content', "messages.#(content).role",
    "messages.#(role==~true)#.role", "items.#.name", "items.#.size", "items.1.name",
    "items.#(size>1)#.name", "items.#(size>=2).size", "items.#(size<2)#.name",
    'friends.#(last=="Murphy")#.first', 'friends.#(nets.#(=="fb"))#.first',
    "friends.#(age>45)#.last", "friends.#.nets.0", "friends.@reverse.#.first",
    "name.first", "name.l*", "name.fir?t", "na*.last", "metadata.user\\.id", "metadata.a\\*b",
    "metadata.tags.1", "metadata.tags|@reverse", "metadata|@keys", "metadata|@values",
    "friends|@reverse|0.first", "@this", "@reverse", "age", "empty.#", "nul", "nul.x",
    "tools.#.function.name", "tools.0.function.parameters", "{model,temperature}",
    "[model,stream]", '{"m":model,"n":messages.#}', "!true", "model|@ugly", "model.@pretty",
    "a.b.c.#.d", "a.b.c.1.d", "@flatten", "items|@flatten", "temperature.x", "0", "1.a", "#",
    "choices.#(index==0).delta.content", "usage.prompt_tokens",
]


def reference(obj, query):
    """What gjson-py itself answers (None on an error, as Higress's Value() gives nil)."""
    try:
        return gjson.get(obj, query, quiet=True)
    except Exception:
        return None


@pytest.mark.parametrize("query", QUERIES)
def test_compiled_equals_gjson_get(query):
    """The compiled evaluation reproduces gjson-py on every object: a change in the gjson-py
    internals it relies on fails here."""
    path = compile_path(query)
    for obj in OBJECTS:
        assert path.get(obj) == reference(obj, query), (query, obj)


def test_queries_exercise_real_values():
    """The equivalence above is not vacuous: most queries find something somewhere."""
    empty = {q for q in QUERIES if all(reference(o, q) is None for o in OBJECTS)}
    assert empty == {"choices.0.delta.reasoning_content", "messages.9", "nul", "nul.x",
                     'messages.#(role=="nobody").content', "temperature.x",
                     "usage.prompt_tokens"}


@pytest.mark.parametrize("query,obj,expected", [
    ("messages.@reverse.0.content", {"messages": [{"content": "a"}, {"content": "b"}]}, "b"),
    ("messages.@reverse.0.content", CHAT, CHAT["messages"][-1]["content"]),
    ("choices.0.delta.content", CHUNK, "Hel"),
    ("choices.0.delta.reasoning_content", CHUNK, None),
    ("choices.1.delta.content", CHUNK, None),
    ("messages.#", CHAT, 4),
    ("items.#.name", ITEMS, ["a", "b"]),
    ('friends.#(last=="Murphy").first', ITEMS, "Dale"),
    ('friends.#(last=="Murphy")#.first', ITEMS, ["Dale", "Jane"]),
    ("friends.#(age>45)#.first", ITEMS, ["Roger", "Jane"]),
    ('friends.#(nets.#(=="fb"))#.first', ITEMS, ["Dale", "Roger"]),
    ("metadata.user\\.id", CHAT, "u-1"),
    ("name.fir?t", ITEMS, "Tom"),
    ("na*.last", ITEMS, "Anderson"),
    ("friends|@reverse|0.first", ITEMS, "Jane"),
    ("{model,temperature}", CHAT, {"model": "gpt-4o", "temperature": 0.2}),
    ("missing.path", CHAT, None),
])
def test_gjson_values(query, obj, expected):
    assert compile_path(query).get(obj) == expected


@pytest.mark.parametrize("go_style,quoted", [
    ("messages.#(role==user).content", 'messages.#(role=="user").content'),
    ("messages.#(role==user)#.content", 'messages.#(role=="user")#.content'),
    ("messages.#(role!=user)#.role", 'messages.#(role!="user")#.role'),
    ("messages.#(role%us*)#.content", 'messages.#(role%"us*")#.content'),
    ('friends.#(nets.#(==fb))#.first', 'friends.#(nets.#(=="fb"))#.first'),
])
def test_unquoted_query_values_are_strings(go_style, quoted):
    """tidwall/gjson (Higress) compares an unquoted query value as a string; gjson-py alone
    would reject it."""
    assert reference(CHAT, go_style) is None or reference(ITEMS, go_style) is None
    for obj in (CHAT, ITEMS):
        assert compile_path(go_style).get(obj) == reference(obj, quoted)
    assert compile_path(go_style).get(CHAT) is not None or compile_path(go_style).get(ITEMS)


def test_parsed_once(monkeypatch):
    """Evaluation never re-parses the query."""
    path = compile_path('friends.#(last=="Murphy")#.first')

    def no_parse(*a, **k):
        raise AssertionError("re-parsed")

    monkeypatch.setattr(GJSONObj, "_parse", no_parse)
    assert path.get(ITEMS) == ["Dale", "Jane"]
    assert path.get(ITEMS) == ["Dale", "Jane"]


def test_no_state_leaks_between_evaluations():
    """gjson-py keeps per-evaluation flags (after ``#``); each call starts clean."""
    hashed, plain = compile_path("items.#.name"), compile_path("items.1.name")
    for _ in range(3):
        assert hashed.get(ITEMS) == ["a", "b"]
        assert plain.get(ITEMS) == "b"
        assert compile_path("items.#").get(ITEMS) == 5


@pytest.mark.parametrize("text,expected", [
    ("$.messages[0].content", "Be brief."),
    ("$.messages[-1:].role", "user"),
    ("$.messages[?(@.role=='user')].content",
     ["first question", CHAT["messages"][3]["content"]]),
    ("$.messages[?(@.role=='system')].content", "Be brief."),
    ("$.messages[?(@.role=='nobody')].content", None),
    ("$.tools[*].function.name", ["get_weather", "lookup"]),
    ("$..name", ["get_weather", "lookup"]),
    ("$.metadata.tags", ["a", "b"]),
    ("$.nope", None),
    ("$.temperature", 0.2),
    ("$.messages.length", None),  # not a JSONPath feature without the ext `len` extension
])
def test_jsonpath(text, expected):
    path = compile_path(text)
    assert path.text == text
    assert path.get(CHAT) == expected


def test_jsonpath_single_match_of_a_list_is_the_list():
    assert compile_path("$.metadata.tags").get(CHAT) == ["a", "b"]
    assert compile_path("$.metadata.tags[*]").get(CHAT) == ["a", "b"]
    assert compile_path("$.metadata.tags[0]").get(CHAT) == "a"


@pytest.mark.parametrize("text", [
    "", "a..b", "a.", ".a", "a|", "messages.@nosuchmodifier", "a.@", "a\\",
    "messages.#(role==~maybe)", "messages.#()", "a.@reverse:x",
    "$[", "$.a[?(@.b==)]", "$..[", "$.a[", "${",
])
def test_compile_errors(text):
    with pytest.raises(PathError) as e:
        compile_path(text)
    msg = str(e.value)
    assert msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


def test_compile_error_messages_say_what():
    with pytest.raises(PathError, match="empty"):
        compile_path("")
    with pytest.raises(PathError, match="consecutive path delimiters"):
        compile_path("a..b")
    with pytest.raises(PathError, match="unknown modifier @nosuch"):
        compile_path("a.@nosuch")
    with pytest.raises(PathError, match="^JSONPath: "):
        compile_path("$[")
    with pytest.raises(PathError, match="^gjson: .*==~"):
        compile_path("a.#(b==~maybe)")
    with pytest.raises(PathError):
        compile_path(None)  # type: ignore[arg-type]


def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "none"] + (["list", "dict"] * 2 if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return rng.choice(["", "a", "user", "0", "#", "x.y", "\u00e9\u4e2d", "\ud800"])
    if kind == "int":
        return rng.choice([0, 1, -1, 2**70, 5])
    if kind == "float":
        return rng.choice([0.5, -0.0, 1e308])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["a", "b", "messages", "content", "role", "0", "#", "items", "name", "user.id"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def test_evaluation_never_raises():
    rng = random.Random(1234)
    paths = [compile_path(q) for q in QUERIES] + [
        compile_path(t) for t in ("$..a", "$.messages[?(@.role=='user')].content",
                                  "$.items[?(@.size > 1)].name", "$[0]", "$.a[*].b")]
    for _ in range(400):
        obj = _random_json(rng)
        for p in paths:
            p.get(obj)  # must not raise
    # and on values that are not JSON at all
    for odd in (object(), b"bytes", {1: 2}, {"a": {1, 2}}, float("nan")):
        for p in paths:
            p.get(odd)


def test_compiled_path_api():
    p = compile_path("a.b")
    assert isinstance(p, CompiledPath)
    assert p.text == "a.b"
    assert "a.b" in repr(p)


def test_compiled_faster_than_gjson_get(capsys):
    """Per call on a typical chat request body, for the Higress question path; the figure is
    printed (``-s``) and must show the parse is gone."""
    q = "messages.@reverse.0.content"
    path = compile_path(q)
    n = 3000
    compiled = min(timeit.repeat(lambda: path.get(CHAT), number=n, repeat=5)) / n
    plain = min(timeit.repeat(lambda: gjson.get(CHAT, q, quiet=True), number=n, repeat=5)) / n
    with capsys.disabled():
        print(f"\n{q}: compiled {compiled * 1e6:.2f} us, gjson.get {plain * 1e6:.2f} us, "
              f"ratio {plain / compiled:.1f}x")
    assert plain / compiled > 1.5
