"""One-line meanings of the config keys, read from the ``# comments`` next to the fields in caee/core/config.py.

The comments are the single place where a key is explained (with its source where it is a
paper / official-code choice); ``caee <command> --help`` lists them. Reading the source with
``ast`` + ``tokenize`` instead of importing anything heavy keeps ``--help`` free of torch.

Which comment belongs to a field:
- the comment after the value on the field's line, continued by comment-only lines below it that
  are indented past the field name (a wrapped comment);
- else the comment-only lines directly above the field (a block comment introducing it);
- else the comment of the same field in a base class (``batch_size`` of ``AffinityTrainConfig``
  is explained in ``TrainConfig``).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import io
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from caee.core import config as config_module
@dataclass(frozen=True)
class KeyDoc:
    key: str          # dotted, e.g. "masking.depth"
    default: Any
    choices: tuple    # Literal choices, () when free
    meaning: str


def _comments(source: str) -> dict[int, tuple[int, str, bool]]:
    """line -> (column, text, whole line is a comment)."""
    out: dict[int, tuple[int, str, bool]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            (row, col), line = tok.start, tok.line
            out[row] = (col, tok.string.lstrip("#").strip(), line[:col].strip() == "")
    return out


def _field_comment(node: ast.AnnAssign, comments: dict[int, tuple[int, str, bool]]) -> str:
    row, name_col = node.lineno, node.col_offset
    own = comments.get(node.end_lineno or row)
    if own and not own[2]:
        parts, nxt = [own[1]], (node.end_lineno or row) + 1
        while nxt in comments and comments[nxt][2] and comments[nxt][0] > name_col:
            parts.append(comments[nxt][1])
            nxt += 1
        return " ".join(parts)
    above, prev = [], row - 1
    while prev in comments and comments[prev][2] and comments[prev][0] == name_col:
        above.insert(0, comments[prev][1])
        prev -= 1
    return " ".join(above)


@functools.lru_cache(maxsize=1)
def field_comments() -> dict[str, dict[str, str]]:
    """``{class name: {field: comment}}`` for every dataclass in caee/core/config.py."""
    source = Path(config_module.__file__).read_text()
    comments = _comments(source)
    out: dict[str, dict[str, str]] = {}
    for cls in ast.parse(source).body:
        if isinstance(cls, ast.ClassDef):
            out[cls.name] = {n.target.id: _field_comment(n, comments) for n in cls.body
                             if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return out


def _meaning(cls: type, name: str) -> str:
    table = field_comments()
    for klass in cls.__mro__:
        text = table.get(klass.__name__, {}).get(name)
        if text:
            return text
    return ""


def _walk(obj: Any, prefix: str, sections: tuple[str, ...] | None = None) -> Iterator[KeyDoc]:
    """Leaf keys of the dataclass ``obj``; nested sections only when named in ``sections``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            if sections is None or f.name in sections:
                yield from _walk(value, key + ".")
            continue
        tp = hints[f.name]
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
        yield KeyDoc(key, value, choices, _meaning(type(obj), f.name))


def key_docs(sections: tuple[str, ...] | None = None) -> list[KeyDoc]:
    """The keys of ``sections`` of the default :class:`~caee.core.config.Config` (None: every key);
    top-level scalar keys (``work_dir``, ``device``, ...) are always included."""
    return list(_walk(config_module.Config(), "", sections))


def format_key_docs(docs: list[KeyDoc]) -> str:
    """One line per key: ``  key = default  [choices]  meaning``."""
    rows = []
    for d in docs:
        value = f"{d.key} = {d.default!r}"
        extra = f"{{{', '.join(map(str, d.choices))}}} " if d.choices else ""
        rows.append((value, f"{extra}{d.meaning}".strip()))
    width = min(max((len(v) for v, _ in rows), default=0), 48)
    return "\n".join(f"  {v:<{width}}  {m}".rstrip() for v, m in rows)
