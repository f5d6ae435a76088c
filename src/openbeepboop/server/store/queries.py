"""Named queries: each dialect's SQL lives in `store/sql/<dialect>.sql`, one file per
dialect with the same names in the same order, so that a change to a rule of the queue
(the claim, fencing, retry-or-fail, the reaper) reads as one diff per dialect.

A query starts at a line `-- name: <name>`; the comment lines after it say what it does.
Parameters are numbered (`?1` in SQLite, `$1` in PostgreSQL). In braces:
`{job_columns}` and the other names of `rows.COLUMN_LISTS` stand for their column lists;
`{batch_marks}` and `{batch_sets}` for a batch's values (numbered from 1) and its
assignments (numbered from 3, after the id and version); `{where}` and `{limit}` are a
listing's filters, filled in per call (`Queries.listing`).

>>> q = Queries("sqlite")
>>> q["get_job"].startswith("SELECT seq, id, owner")
True
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

from openbeepboop.server.store.rows import BATCH_FIELDS, COLUMN_LISTS

MARKS = {"sqlite": "?", "postgres": "$"}
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


class Queries:
    """The named queries of one dialect."""

    def __init__(self, dialect: str) -> None:
        self.mark = MARKS[dialect]
        marks = ", ".join(f"{self.mark}{i}" for i in range(1, len(BATCH_FIELDS) + 1))
        sets = ", ".join(
            f"{name} = {self.mark}{i}"
            for i, name in enumerate((f for f in BATCH_FIELDS if f != "id"), start=3)
        )
        fill = {**COLUMN_LISTS, "batch_marks": marks, "batch_sets": sets}
        self._sql = {
            name: re.sub(r"\{(\w+)\}", lambda m: fill.get(m.group(1), m.group(0)), sql)
            for name, sql in _load(dialect).items()
        }

    def __getitem__(self, name: str) -> str:
        return self._sql[name]

    def listing(self, name: str, limit: int | None = None, **filters: Any) -> tuple[str, list[Any]]:
        """Query `name` with `{where}` made of the filters that are not None (`before_seq`:
        `seq <` it, `created_after`: `created_at >=` it, `created_before`: `created_at <`
        it, others: equal) and `{limit}` the next parameter; and its arguments."""
        where = ["1 = 1"]
        args: list[Any] = []
        for column, value in filters.items():
            if value is None:
                continue
            args.append(value)
            mark = f"{self.mark}{len(args)}"
            where.append(f"{_RANGES.get(column, f'{column} =')} {mark}")
        sql = self._sql[name].replace("{where}", " AND ".join(where))
        if limit is not None:
            args.append(limit)
            sql = sql.replace("{limit}", f"{self.mark}{len(args)}")
        return sql, args


# listing filters that are ranges rather than equalities
_RANGES = {
    "before_seq": "seq <",
    "created_after": "created_at >=",
    "created_before": "created_at <",
}


def _load(dialect: str) -> dict[str, str]:
    """Every query of `dialect` by name, its comment lines dropped."""
    text = resources.files("openbeepboop.server.store").joinpath("sql", f"{dialect}.sql")
    parts = _NAME.split(text.read_text())
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"{dialect}.sql: query {name!r} is defined twice")
        lines = [line.rstrip() for line in body.splitlines() if not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip().removesuffix(";").strip()
    return queries
