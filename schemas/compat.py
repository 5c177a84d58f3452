"""BACKWARD compatibility of Avro schemas (new reader vs old writer), checked against git history.

Rules: Avro 1.11.1 specification, "Schema Resolution"
(https://avro.apache.org/docs/1.11.1/specification/#schema-resolution). BACKWARD means a
consumer using the new (working-copy) schema as reader schema can read every record written
with any earlier committed version (Confluent's ``BACKWARD_TRANSITIVE``). Run as
``python -m schemas.compat [--repo PATH]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.utils import generate_many

from schemas.errors import SchemaError

__all__ = [
    "AvroSchema",
    "SchemaHistory",
    "check_backward",
    "check_history",
    "check_repository",
    "main",
    "names_match",
]

AvroSchema = dict[str, Any] | list[Any] | str

logger = logging.getLogger(__name__)

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_PROMOTIONS = {
    "int": {"long", "float", "double"},
    "long": {"float", "double"},
    "float": {"double"},
    "string": {"bytes"},
    "bytes": {"string"},
}
_SCHEMA_DIR = "schemas/avro"


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def names_match(writer_name: str, reader: dict[str, Any]) -> bool:
    """Tell whether a writer named type resolves to a reader named type (by name or alias).

    Names compare unqualified, as the specification's resolution rules say; reader ``aliases``
    let a renamed type read data written under its old name.
    """
    candidates = {_short(reader["name"]), *(_short(a) for a in reader.get("aliases", []))}
    return _short(writer_name) in candidates


@dataclass
class _Resolver:
    reader_named: dict[str, Any]
    writer_named: dict[str, Any]
    seen: set[tuple[str, str]] = field(default_factory=set)

    def _deref(self, schema: AvroSchema, named: dict[str, Any]) -> AvroSchema:
        if isinstance(schema, str) and schema not in _PRIMITIVES:
            return named[schema]  # type: ignore[no-any-return]
        if isinstance(schema, dict) and schema["type"] in _PRIMITIVES:
            return schema["type"]  # type: ignore[no-any-return]  # logical types resolve by base
        return schema

    def describe(self, schema: AvroSchema) -> str:
        if isinstance(schema, str):
            return schema
        if isinstance(schema, list):
            return "union [" + ", ".join(self.describe(b) for b in schema) + "]"
        if schema["type"] == "array":
            return f"array<{self.describe(schema['items'])}>"
        if schema["type"] == "map":
            return f"map<{self.describe(schema['values'])}>"
        if "name" in schema:
            return f"{schema['type']} {schema['name']}"
        return str(schema["type"])

    def matches(self, reader: AvroSchema, writer: AvroSchema) -> bool:
        """The specification's "schemas match" test (one level; unions always match)."""
        r = self._deref(reader, self.reader_named)
        w = self._deref(writer, self.writer_named)
        if isinstance(r, list) or isinstance(w, list):
            return True
        if isinstance(r, str) or isinstance(w, str):
            return (
                isinstance(r, str)
                and isinstance(w, str)
                and (r == w or r in _PROMOTIONS.get(w, ()))
            )
        if r["type"] != w["type"]:
            return False
        if r["type"] == "array":
            return self.matches(r["items"], w["items"])
        if r["type"] == "map":
            return self.matches(r["values"], w["values"])
        if r["type"] == "fixed" and r["size"] != w["size"]:
            return False
        return names_match(w["name"], r)

    def check(self, reader: AvroSchema, writer: AvroSchema, path: str) -> list[str]:
        """Return every way data written with ``writer`` fails to resolve against ``reader``."""
        r = self._deref(reader, self.reader_named)
        w = self._deref(writer, self.writer_named)
        if isinstance(w, list):
            return [p for branch in w for p in self.check(r, branch, path)]
        if isinstance(r, list):
            for branch in r:  # the first matching reader branch is used
                if self.matches(branch, w):
                    return self.check(branch, w, path)
            return [f"{path}: writer type {self.describe(w)} is not in reader {self.describe(r)}"]
        if isinstance(r, dict) and isinstance(w, dict) and r["type"] == w["type"] == "array":
            return self.check(r["items"], w["items"], f"{path}[]")
        if isinstance(r, dict) and isinstance(w, dict) and r["type"] == w["type"] == "map":
            return self.check(r["values"], w["values"], f"{path}{{}}")
        if not self.matches(r, w):
            why = "" if isinstance(r, str) or isinstance(w, str) else self._mismatch(r, w)
            return [
                f"{path}: writer type {self.describe(w)} cannot be read as {self.describe(r)}{why}"
            ]
        if isinstance(r, str) or isinstance(w, str):
            return []
        kind = r["type"]
        if kind == "enum":
            return self._check_enum(r, w, path)
        if kind == "record":
            return self._check_record(r, w, path)
        return []  # fixed: size and name already compared by matches()

    def _mismatch(self, r: dict[str, Any], w: dict[str, Any]) -> str:
        if r["type"] == "fixed" and w["type"] == "fixed" and r["size"] != w["size"]:
            return f" (size {w['size']} vs {r['size']})"
        if r["type"] == w["type"] and "name" in r:
            return " (names differ and no reader alias matches)"
        return ""

    def _check_enum(self, r: dict[str, Any], w: dict[str, Any], path: str) -> list[str]:
        missing = [s for s in w["symbols"] if s not in r["symbols"]]
        if not missing or "default" in r:
            return []
        return [
            f"{path}: writer enum symbols {missing} are missing from reader enum "
            f"{r['name']}, which has no default"
        ]

    def _check_record(self, r: dict[str, Any], w: dict[str, Any], path: str) -> list[str]:
        key = (r["name"], w["name"])
        if key in self.seen:  # recursive type: already being checked higher up
            return []
        self.seen.add(key)
        writer_fields = {f["name"]: f for f in w["fields"]}
        problems: list[str] = []
        for rf in r["fields"]:
            names = [rf["name"], *rf.get("aliases", [])]
            wf = next((writer_fields[n] for n in names if n in writer_fields), None)
            field_path = f"{path}.{rf['name']}"
            if wf is not None:
                problems += self.check(rf["type"], wf["type"], field_path)
            elif "default" not in rf:
                problems.append(
                    f"{field_path}: reader field is not in the writer schema and has no default"
                )
        return problems


def _empirical(reader: AvroSchema, writer: AvroSchema, path: str, count: int) -> list[str]:
    state = random.getstate()
    random.seed(0)  # reproducible datums; the caller's random state is restored below
    try:
        datums = list(generate_many(writer, count))
    finally:
        random.setstate(state)
    for datum in datums:
        buffer = io.BytesIO()
        schemaless_writer(buffer, writer, datum)
        buffer.seek(0)
        try:
            schemaless_reader(buffer, writer, reader)
        except Exception as exc:  # fastavro raises many types on resolution failure
            return [
                f"{path}: fastavro could not read a generated datum written with the old "
                f"schema: {type(exc).__name__}: {exc}"
            ]
    return []


def check_backward(reader: AvroSchema, writer: AvroSchema, *, samples: int = 20) -> list[str]:
    """Check that data written with ``writer`` (old) can be read with ``reader`` (new).

    The rules of the Avro specification's "Schema Resolution" are applied statically; when
    they pass, ``samples`` random datums from ``fastavro.utils.generate_many(writer, samples)``
    are written with the writer schema and read back with the reader schema as a second opinion.

    Args:
        reader: New schema (parsed JSON: dict, list or str).
        writer: Old schema.
        samples: Number of generated datums for the empirical check (0 skips it).

    Returns:
        Human-readable incompatibilities, each starting with the field path
        (``"InboundMessage.channel: ..."``); empty when compatible.
    """
    parsed: list[Any] = []
    named: list[dict[str, Any]] = []
    for role, schema in (("reader", reader), ("writer", writer)):
        named.append({})
        try:
            parsed.append(parse_schema(schema, named_schemas=named[-1], _write_hint=False))
        except Exception as exc:  # SchemaParseException, UnknownType, KeyError, ...
            return [f"{role} schema is not valid Avro: {type(exc).__name__}: {exc}"]
    root = _short(parsed[0]["name"]) if isinstance(parsed[0], dict) and "name" in parsed[0] else "$"
    problems = _Resolver(named[0], named[1]).check(parsed[0], parsed[1], root)
    if not problems and samples > 0:
        problems = _empirical(parsed[0], parsed[1], root, samples)
    return problems


@dataclass(frozen=True)
class SchemaHistory:
    """Result of checking one ``.avsc`` file against its git history.

    Attributes:
        name: File stem, e.g. ``"InboundMessage"``.
        versions: Distinct committed versions that differ from the working copy, all checked.
        committed: Commits holding the file (0: never committed).
        problems: Incompatibilities, each prefixed by the commit it was found against.
    """

    name: str
    versions: int
    committed: int
    problems: list[str]


def _git(repo_root: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo_root), *args], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        stderr = getattr(exc, "stderr", "") or ""
        raise SchemaError(
            f"git {' '.join(args)} failed in {repo_root}: {stderr.strip() or exc}"
        ) from exc
    return done.stdout


def check_history(repo_root: Path, path: Path) -> SchemaHistory:
    """Check a working-copy ``.avsc`` file is BACKWARD compatible with each committed version.

    Versions come from ``git log --format=%H -- <path>`` and ``git show <sha>:<path>``; a
    committed version identical (as JSON) to the working file is not an earlier version.

    Raises:
        SchemaError: ``git`` failed (not a repository, git missing) or the working file is not
            JSON.
    """
    rel = path.resolve().relative_to(repo_root.resolve()).as_posix()
    try:
        current = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SchemaError(f"{rel}: cannot read working schema: {exc}") from exc
    _git(repo_root, "rev-parse", "--is-inside-work-tree")  # raises outside a repository
    has_commits = subprocess.run(
        ["git", "-C", str(repo_root), "rev-parse", "--quiet", "--verify", "HEAD"],
        capture_output=True,
    )
    shas = (
        _git(repo_root, "log", "--format=%H", "--", rel).split()
        if has_commits.returncode == 0
        else []
    )
    earlier: list[tuple[str, Any]] = []
    committed = 0
    for sha in shas:
        try:
            old = json.loads(_git(repo_root, "show", f"{sha}:{rel}"))
        except SchemaError:
            continue  # the commit deleted the file
        except ValueError as exc:
            logger.warning("%s at %s is not JSON, skipped: %s", rel, sha[:12], exc)
            continue
        committed += 1
        if old != current and all(old != seen for _, seen in earlier):
            earlier.append((sha, old))
    problems = [
        f"{path.stem} (vs {sha[:12]}): {problem}"
        for sha, old in earlier
        for problem in check_backward(current, old)
    ]
    return SchemaHistory(path.stem, versions=len(earlier), committed=committed, problems=problems)


def check_repository(repo_root: Path) -> list[str]:
    """Check every ``schemas/avro/*.avsc`` in the working copy against its git history.

    Returns:
        All incompatibilities (empty when every schema is compatible or has no history).

    Raises:
        SchemaError: ``git`` failed or a working schema file is not JSON.
    """
    return [p for path in _schema_files(repo_root) for p in check_history(repo_root, path).problems]


def _schema_files(repo_root: Path) -> list[Path]:
    return sorted((repo_root / _SCHEMA_DIR).glob("*.avsc"))


def main(argv: list[str] | None = None) -> int:
    """Print one line per schema; return 0 when all are compatible, 1 if not, 2 on error."""
    parser = argparse.ArgumentParser(prog="python -m schemas.compat", description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="git working copy root")
    args = parser.parse_args(argv)
    files = _schema_files(args.repo)
    if not files:
        print(f"no {_SCHEMA_DIR}/*.avsc under {args.repo}", file=sys.stderr)
        return 2
    failed = False
    for path in files:
        try:
            history = check_history(args.repo, path)
        except SchemaError as exc:
            print(f"{path.stem}: error: {exc}", file=sys.stderr)
            return 2
        plural = "s" if history.versions != 1 else ""
        if history.problems:
            failed = True
            print(f"{history.name}: INCOMPATIBLE ({history.versions} earlier version{plural})")
            print("\n".join(f"  - {p}" for p in history.problems))
        elif history.versions:
            print(f"{history.name}: compatible with {history.versions} earlier version{plural}")
        elif history.committed:
            print(f"{history.name}: unchanged since last commit, no earlier version to check")
        else:
            print(f"{history.name}: not committed yet, no earlier version to check")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
