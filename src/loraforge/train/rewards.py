"""GRPO's reward functions: built-ins for verifiable answers, and the user's own plain Python.

A reward is `reward(prompt, completion, **row) -> float`: `prompt` the prompt's text (its last user
turn), `completion` the sampled answer, `row` the data record's other fields (`answer`, `label`, or any
field of a {"prompt": ...} record). `grpo.rewards` lists them; their values are summed.

  exact_match       1 if the completion equals row["answer"] (stripped), else 0
  normalized_match  the same after lower-casing and collapsing spaces and punctuation at the ends
  numeric           1 if the last number in the completion equals row["answer"] as a number (1e-6)
  regex             1 if the completion matches eval.pattern in full
  json_schema       1 if the completion is JSON valid against eval.schema_file (jsonschema), else 0
  FILE.py[:NAME]    the function NAME (default `reward`) of a Python file, loaded once
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from loraforge.errors import LoraforgeError

Reward = Callable[..., float]
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?|-?\.\d+")
BUILTINS = ("exact_match", "normalized_match", "numeric", "regex", "json_schema")


def _answer(row: dict) -> str:
    value = row.get("answer", row.get("label"))
    if value is None:
        raise LoraforgeError("the reward needs a reference answer: give each prompt an 'answer' field")
    return str(value)


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,!?;:'\"")


def exact_match(prompt: str, completion: str, **row) -> float:
    return float(completion.strip() == _answer(row).strip())


def normalized_match(prompt: str, completion: str, **row) -> float:
    return float(_norm(completion) == _norm(_answer(row)))


def numeric(prompt: str, completion: str, **row) -> float:
    found = _NUMBER.findall(completion)
    if not found:
        return 0.0
    try:
        got, want = float(found[-1].replace(",", "")), float(_answer(row).replace(",", ""))
    except ValueError:
        return 0.0
    return float(math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6))


def _regex(pattern: str | None) -> Reward:
    if not pattern:
        raise LoraforgeError("grpo.rewards has 'regex' but eval.pattern is not set", hint="set eval.pattern")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise LoraforgeError(f"eval.pattern is not a valid regular expression: {e}") from None
    return lambda prompt, completion, **row: float(compiled.fullmatch(completion.strip()) is not None)


def _json_schema(schema_file: str | None) -> Reward:
    if not schema_file or not Path(schema_file).is_file():
        raise LoraforgeError("grpo.rewards has 'json_schema' but eval.schema_file is not a file",
                             where=str(schema_file), hint="set eval.schema_file to a JSON Schema file")
    try:
        import jsonschema
    except ImportError:
        raise LoraforgeError("the json_schema reward needs jsonschema", hint="pip install jsonschema") from None
    validator = jsonschema.Draft202012Validator(json.loads(Path(schema_file).read_text()))

    def reward(prompt: str, completion: str, **row) -> float:
        try:
            value = json.loads(completion.strip())
        except ValueError:
            return 0.0
        return float(validator.is_valid(value))
    return reward


def _from_file(spec: str) -> Reward:
    path, _, name = spec.partition(".py:")
    path = path + ".py" if name else spec
    name = name or "reward"
    if not Path(path).is_file():
        raise LoraforgeError(f"reward file not found (grpo.rewards entry {spec!r})", where=path)
    module_spec = importlib.util.spec_from_file_location(f"loraforge_rewards_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: say where it failed, whatever it raised
        raise LoraforgeError(f"the reward file raised {type(e).__name__}: {e}", where=path) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise LoraforgeError(f"the reward file defines no function {name!r}", where=path,
                             hint="def reward(prompt, completion, **row) -> float")
    return fn


def load_rewards(specs: list[str], pattern: str | None = None, schema_file: str | None = None) -> list[Reward]:
    """The reward functions `grpo.rewards` names."""
    out = []
    for spec in specs:
        if spec in ("exact_match", "normalized_match", "numeric"):
            out.append(globals()[spec])
        elif spec == "regex":
            out.append(_regex(pattern))
        elif spec == "json_schema":
            out.append(_json_schema(schema_file))
        elif spec.endswith(".py") or ".py:" in spec:
            out.append(_from_file(spec))
        else:
            raise LoraforgeError(f"unknown reward {spec!r}", hint=f"use {', '.join(BUILTINS)} or a FILE.py[:NAME]")
    return out


def score(rewards: list[Reward], prompt: str, completion: str, row: dict, where: str = "") -> float:
    """The summed reward of one completion; a user function that fails or returns no number is an error."""
    total = 0.0
    for fn in rewards:
        try:
            value = float(fn(prompt, completion, **row))
        except LoraforgeError:
            raise
        except Exception as e:  # the user's function: name it and the record
            raise LoraforgeError(f"reward {getattr(fn, '__name__', fn)} raised {type(e).__name__}: {e}",
                                 where=where) from None
        if math.isnan(value):
            raise LoraforgeError(f"reward {getattr(fn, '__name__', fn)} returned NaN", where=where)
        total += value
    return total
