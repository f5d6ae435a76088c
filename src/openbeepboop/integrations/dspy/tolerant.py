"""A DSPy adapter that reads the sloppy answers of small models instead of raising.

DSPy's `ChatAdapter` asks the model to answer in sections headed `[[ ## field ## ]]`
and raises `AdapterParseError` when a section is missing (then, by default, asks the
model again through `JSONAdapter`: a second call). A 270M-parameter model often writes
`Answer: Paris`, `**answer**`, `[[ ## Answer ## ]]`, a JSON object, or just `Paris`.
`TolerantChatAdapter` formats prompts exactly as `ChatAdapter` does and parses strictly
first; only when that fails does it read the answer leniently (`tolerant_parse`):

- headers in any case and spacing, with or without the brackets and hashes
  (`[[ ## Answer ## ]]`, `[[## answer ##]]`, `## answer ##`, `### Answer`, `**Answer:**`,
  `Answer:`), `final answer` for `final_answer`; only names of the signature's fields
  count as headers, so `Note: ...` inside an answer stays text;
- text before the first header, extra text around the sections, input sections the
  model echoed back, and anything after `[[ ## completed ## ]]` (or a missing one);
  `<think>...</think>` blocks are dropped;
- a JSON object (even a broken one, repaired) whose keys name the fields, in any case;
- a lone output field given as plain text: the text before any header becomes the first
  output field that has no section (so a one-field signature takes the whole answer);
- values that do not parse as their type: a number is taken from the text for `int` and
  `float`, yes/no/true/false for `bool`, a `Literal` or enum value named anywhere in the
  text (any case);
- an empty section (a header given twice, empty the first time) takes the text of
  the next one;
- a field still missing gets `""` (a `str` field) or None (any other type), unless the
  adapter was made with `fill_missing=False`, which raises `AdapterParseError` as
  `ChatAdapter` does.
"""

from __future__ import annotations

import enum
import math
import re
import typing
from typing import Any

import json_repair
from dspy.adapters import ChatAdapter
from dspy.adapters.utils import parse_value
from dspy.utils.exceptions import AdapterParseError

COMPLETED = "completed"
THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL | re.IGNORECASE)
NAME = r"(?P<name>[A-Za-z][A-Za-z0-9_]*(?: [A-Za-z0-9_]+)*)"
# `[[ ## name ## ]]`, `## name ##`, `### name`, `**name**:`, `**name:**`, `[name]` ...
DECORATED = re.compile(
    r"^(?:\[\[?|#+|\*\*)\s*#*\s*"
    + NAME
    + r"\s*(?:#*\s*\]{0,2}|\*\*)\s*:?\s*(?:\*\*)?\s*(?P<rest>.*)$"
)
PLAIN = re.compile(r"^" + NAME + r"\s*:\s*(?P<rest>.*)$")  # `name: value`
# a number: its whole part (thousands grouped by `,` or `_` allowed), then a fraction
# (`.` or `,`) and an exponent
NUMBER = re.compile(
    r"(?P<sign>[-+]?)(?P<whole>\d{1,3}(?:[,_]\d{3})+(?!\d)|\d+)?"
    r"(?P<fraction>(?(whole)[.,]|\.)\d+)?(?P<exponent>[eE][-+]?\d+)?"
)
YES = frozenset({"yes", "true", "y", "correct", "1"})
NO = frozenset({"no", "false", "n", "incorrect", "0"})


class TolerantChatAdapter(ChatAdapter):  # type: ignore[misc]
    """`ChatAdapter` whose parsing forgives small models (see the module's docstring).

    It does not fall back to `JSONAdapter` by default (that is a second model call per
    miss); pass `use_json_adapter_fallback=True` to have it anyway. Other arguments as
    `ChatAdapter`'s.

        dspy.configure(lm=lm, adapter=TolerantChatAdapter())
    """

    def __init__(self, *, fill_missing: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("use_json_adapter_fallback", False)
        super().__init__(**kwargs)
        self.fill_missing = fill_missing

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        try:
            fields = dict(super().parse(signature, completion))
        except AdapterParseError:
            return tolerant_parse(signature, completion, fill_missing=self.fill_missing)
        empty = [k for k, v in fields.items() if v == ""]
        if empty:  # a section given twice, empty first: take the text the model did give
            lenient = tolerant_parse(signature, completion)
            fields.update({k: lenient[k] for k in empty})
        return fields


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "_", name.strip()).lower()


def _header(line: str, known: dict[str, str]) -> tuple[str, str] | None:
    """(field name, the rest of the line) when `line` heads a section of a known field."""
    text = line.strip()
    for pattern in (DECORATED, PLAIN):
        match = pattern.match(text)
        if match and _norm(match["name"]) in known:
            rest = (
                re.sub(r"^[\s#\]*:]*", "", match["rest"]) if pattern is DECORATED else match["rest"]
            )
            return known[_norm(match["name"])], rest.strip()
    return None


def _sections(signature: Any, completion: str) -> tuple[str, dict[str, str]]:
    """(the text before the first header, each output field's first non-empty text)."""
    names = [*signature.input_fields, *signature.output_fields, COMPLETED]
    known = {_norm(n): n for n in names}
    current: str | None = None
    lines: dict[str | None, list[str]] = {None: []}
    found: dict[str, str] = {}

    def close() -> None:
        if current is not None and current in signature.output_fields:
            text = "\n".join(lines[current]).strip()
            if text and not found.get(current):
                found[current] = text

    for line in THINK.sub("", completion).splitlines():
        hit = _header(line, known)
        if hit is None:
            lines.setdefault(current, []).append(line)
            continue
        close()
        current, rest = hit
        if current == COMPLETED:
            break
        lines[current] = [rest] if rest else []
    else:
        close()
    return "\n".join(lines[None]).strip(), found


def _from_json(signature: Any, completion: str) -> dict[str, Any]:
    """Output fields from a JSON object in the answer (keys in any case), repaired."""
    start, end = completion.find("{"), completion.rfind("}")
    if start < 0:
        return {}
    try:
        data = json_repair.loads(completion[start : end + 1 if end > start else None])
    except Exception:
        return {}
    if not isinstance(data, dict):
        return {}
    known = {_norm(n): n for n in signature.output_fields}
    return {known[_norm(str(k))]: v for k, v in data.items() if _norm(str(k)) in known}


def _choices(annotation: Any) -> list[Any]:
    if isinstance(annotation, enum.EnumMeta):
        return list(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return []


def _coerce(value: Any, annotation: Any) -> Any:
    """`value` as `annotation`: DSPy's parsing first, then a lenient reading; raises
    ValueError when neither works."""
    try:
        return parse_value(value, annotation)
    except Exception:
        pass
    text = str(value).strip()
    words = re.findall(r"[A-Za-z0-9]+", text.lower())
    if annotation is bool:
        for word in words:
            if word in YES or word in NO:
                return word in YES
    elif annotation in (int, float):
        number = _number(text, annotation)
        if number is not None:
            return number
    for choice in _choices(annotation):
        label = choice.value if isinstance(choice, enum.Enum) else choice
        if re.search(rf"(?<!\w){re.escape(str(label))}(?!\w)", text, re.IGNORECASE):
            return choice
    raise ValueError(f"cannot read {text[:80]!r} as {getattr(annotation, '__name__', annotation)}")


def _number(text: str, annotation: Any) -> int | float | None:
    """The first number in `text` as an int or a float; None when there is none or it
    is out of range."""
    for found in NUMBER.finditer(text):
        if not (found["whole"] or found["fraction"]):
            continue
        whole = found["sign"] + re.sub(r"[,_]", "", found["whole"] or "0")
        if annotation is int and not found["exponent"]:
            try:
                return int(whole)  # from the digits: exact however long (up to Python's limit)
            except ValueError:
                return None
        fraction = (found["fraction"] or "").replace(",", ".")
        try:
            parsed = float(whole + fraction + (found["exponent"] or ""))
            return int(parsed) if annotation is int else parsed if math.isfinite(parsed) else None
        except (OverflowError, ArithmeticError, ValueError):
            return None
    return None


def _missing(annotation: Any) -> Any:
    return "" if annotation is str else None


def tolerant_parse(signature: Any, completion: str, *, fill_missing: bool = True) -> dict[str, Any]:
    """Read the output fields of `signature` from `completion` leniently (see the
    module's docstring); raises `AdapterParseError` only with `fill_missing=False`."""
    completion = completion or ""
    preamble, texts = _sections(signature, completion)
    raw: dict[str, Any] = dict(texts)
    outputs = signature.output_fields
    if len(raw) < len(outputs):
        for name, value in _from_json(signature, completion).items():
            raw.setdefault(name, value)
    missing = [n for n in outputs if n not in raw]
    if missing and preamble and not preamble.lstrip().startswith("{"):
        raw[missing[0]] = preamble
    fields: dict[str, Any] = {}
    for name, info in outputs.items():
        if name in raw:
            try:
                fields[name] = _coerce(raw[name], info.annotation)
                continue
            except ValueError:
                pass
        if not fill_missing:
            raise AdapterParseError(
                adapter_name="TolerantChatAdapter",
                signature=signature,
                lm_response=completion,
                parsed_result=fields,
            )
        fields[name] = _missing(info.annotation)
    return fields
