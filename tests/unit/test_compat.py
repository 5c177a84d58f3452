"""BACKWARD compatibility: one case per Avro resolution rule, and the git-history check."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from schemas import compat
from schemas.compat import check_backward, check_repository, main


def record(*fields: dict[str, Any], name: str = "Thing", **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": "t", "fields": list(fields), **extra}


def f(name: str, avro_type: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": avro_type, **extra}


def enum(*symbols: str, **extra: Any) -> dict[str, Any]:
    return {"type": "enum", "name": "Colour", "symbols": list(symbols), **extra}


ID = f("id", "string")


def test_identical_schemas_are_compatible() -> None:
    schema = record(ID, f("n", "int", default=0))
    assert check_backward(schema, schema) == []


def test_field_added_with_default_is_compatible() -> None:
    assert check_backward(record(ID, f("n", "int", default=0)), record(ID)) == []


def test_field_added_without_default_is_reported_with_its_path() -> None:
    assert check_backward(record(ID, f("n", "int")), record(ID)) == [
        "Thing.n: reader field is not in the writer schema and has no default"
    ]


def test_field_removed_is_compatible_because_the_reader_ignores_it() -> None:
    assert check_backward(record(ID), record(ID, f("n", "int"))) == []


def test_field_renamed_with_alias_is_compatible() -> None:
    new = record(f("key", "string", aliases=["id"]))
    assert check_backward(new, record(ID)) == []
    assert check_backward(record(f("key", "string")), record(ID)) == [
        "Thing.key: reader field is not in the writer schema and has no default"
    ]


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        ("int", "long"),
        ("int", "float"),
        ("int", "double"),
        ("long", "float"),
        ("long", "double"),
        ("float", "double"),
        ("string", "bytes"),
    ],
)
def test_type_promotion_is_compatible(writer: str, reader: str) -> None:
    assert check_backward(record(f("v", reader)), record(f("v", writer))) == []


def test_bytes_to_string_promotion_passes_the_rules_but_not_on_non_utf8_data() -> None:
    assert check_backward(record(f("v", "string")), record(f("v", "bytes")), samples=0) == []
    problems = check_backward(record(f("v", "string")), record(f("v", "bytes")))
    assert len(problems) == 1
    assert problems[0].startswith(
        "Thing: fastavro could not read a generated datum written with the old schema: "
        "UnicodeDecodeError"
    )


@pytest.mark.parametrize(
    ("writer", "reader"),
    [("long", "int"), ("double", "float"), ("string", "int"), ("boolean", "string")],
)
def test_type_narrowing_or_change_is_reported(writer: str, reader: str) -> None:
    assert check_backward(record(f("v", reader)), record(f("v", writer))) == [
        f"Thing.v: writer type {writer} cannot be read as {reader}"
    ]


def test_logical_timestamp_resolves_by_its_long_base_type() -> None:
    ts = {"type": "long", "logicalType": "timestamp-millis"}
    assert check_backward(record(f("at", ts)), record(f("at", "long"))) == []


def test_enum_symbol_added_is_compatible() -> None:
    assert check_backward(record(f("c", enum("red", "blue"))), record(f("c", enum("red")))) == []


def test_enum_symbol_removed_without_reader_default_is_reported() -> None:
    problems = check_backward(record(f("c", enum("red"))), record(f("c", enum("red", "blue"))))
    assert problems == [
        "Thing.c: writer enum symbols ['blue'] are missing from reader enum t.Colour, "
        "which has no default"
    ]


def test_enum_symbol_removed_with_reader_default_is_compatible() -> None:
    reader = record(f("c", enum("red", "other", default="other")))
    assert check_backward(reader, record(f("c", enum("red", "blue")))) == []


def test_union_widening_is_compatible() -> None:
    assert check_backward(record(f("v", ["null", "string"])), record(f("v", "string"))) == []
    wider = record(f("v", ["null", "string", "long"]))
    assert check_backward(wider, record(f("v", ["null", "string"]))) == []


def test_union_narrowing_reports_each_lost_branch() -> None:
    assert check_backward(record(f("v", "string")), record(f("v", ["null", "string"]))) == [
        "Thing.v: writer type null cannot be read as string"
    ]
    narrower = record(f("v", ["null", "string"]))
    assert check_backward(narrower, record(f("v", ["null", "string", "int"]))) == [
        "Thing.v: writer type int is not in reader union [null, string]"
    ]


def test_union_branch_is_matched_through_promotion() -> None:
    assert check_backward(record(f("v", ["null", "long"])), record(f("v", ["null", "int"]))) == []


def test_array_items_and_map_values_are_checked_with_their_path() -> None:
    reader = record(
        f("xs", {"type": "array", "items": "int"}), f("m", {"type": "map", "values": "int"})
    )
    writer = record(
        f("xs", {"type": "array", "items": "long"}), f("m", {"type": "map", "values": "string"})
    )
    assert check_backward(reader, writer) == [
        "Thing.xs[]: writer type long cannot be read as int",
        "Thing.m{}: writer type string cannot be read as int",
    ]


def test_nested_record_field_added_without_default_names_the_nested_path() -> None:
    inner_old = record(ID, name="Inner")
    inner_new = record(ID, f("extra", "int"), name="Inner")
    reader = record(f("items", {"type": "array", "items": inner_new}))
    writer = record(f("items", {"type": "array", "items": inner_old}))
    assert check_backward(reader, writer) == [
        "Thing.items[].extra: reader field is not in the writer schema and has no default"
    ]


def test_fixed_size_change_is_reported() -> None:
    def fixed(size: int) -> dict[str, Any]:
        return {"type": "fixed", "name": "Hash", "size": size}

    assert check_backward(record(f("h", fixed(16))), record(f("h", fixed(16)))) == []
    assert check_backward(record(f("h", fixed(32))), record(f("h", fixed(16)))) == [
        "Thing.h: writer type fixed t.Hash cannot be read as fixed t.Hash (size 16 vs 32)"
    ]


def test_named_type_rename_needs_an_alias() -> None:
    old = record(ID, name="Old")
    assert check_backward(record(ID, name="New"), old) == [
        "New: writer type record t.Old cannot be read as record t.New "
        "(names differ and no reader alias matches)"
    ]
    assert check_backward(record(ID, name="New", aliases=["t.Old"]), old) == []


def test_recursive_schema_terminates() -> None:
    node = record(f("next", ["null", "Thing"], default=None), name="Thing")
    assert check_backward(node, node) == []


def test_invalid_schema_is_reported_not_raised() -> None:
    problems = check_backward(record(f("n", "int", default="zero")), record(ID))
    assert len(problems) == 1
    assert problems[0].startswith("reader schema is not valid Avro: ")


def test_empirical_second_opinion_fails_on_unreadable_data_and_keeps_random_state() -> None:
    state = random.getstate()
    problems = compat._empirical(record(f("n", "int")), record(f("n", "string")), "Thing", 5)
    assert len(problems) == 1
    assert problems[0].startswith("Thing: fastavro could not read a generated datum")
    assert random.getstate() == state


def test_bundled_schemas_are_compatible_with_themselves() -> None:
    for path in sorted(Path(compat.__file__).parent.glob("avro/*.avsc")):
        schema = json.loads(path.read_text())
        assert check_backward(schema, schema) == [], path.name


# --- git history ----------------------------------------------------------------------------------

V1 = record(ID)
V2 = record(ID, f("n", "int", default=0))
V3 = record(ID, f("n", "int", default=0), f("owner", "string"))


def git(repo: Path, *args: str) -> None:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*command, *args], check=True, capture_output=True)


def write(repo: Path, schema: dict[str, Any]) -> None:
    path = repo / "schemas" / "avro" / "Thing.avsc"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schema, indent=2))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "-q")
    for version in (V1, V2):
        write(tmp_path, version)
        git(tmp_path, "add", "-A")
        git(tmp_path, "commit", "-q", "-m", "schema")
    return tmp_path


def test_uncommitted_schema_has_nothing_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    git(tmp_path, "init", "-q")
    write(tmp_path, V1)
    assert check_repository(tmp_path) == []
    assert main(["--repo", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "Thing: not committed yet, no earlier version to check\n"


def test_compatible_history_passes(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_repository(repo) == []
    assert main(["--repo", str(repo)]) == 0
    assert capsys.readouterr().out == "Thing: compatible with 1 earlier version\n"


def test_schema_unchanged_since_its_only_commit_has_nothing_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    git(tmp_path, "init", "-q")
    write(tmp_path, V1)
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "v1")
    assert main(["--repo", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out == "Thing: unchanged since last commit, no earlier version to check\n"


def test_working_copy_change_is_checked_against_every_committed_version(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(repo, record(ID, f("n", "int", default=0), f("m", "int", default=1)))
    assert check_repository(repo) == []
    assert main(["--repo", str(repo)]) == 0
    assert capsys.readouterr().out == "Thing: compatible with 2 earlier versions\n"


def test_incompatible_working_copy_change_is_reported(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(repo, V3)
    problems = check_repository(repo)
    assert len(problems) == 2  # against V2 (HEAD) and V1
    assert all(
        p.endswith("Thing.owner: reader field is not in the writer schema and has no default")
        for p in problems
    )
    assert main(["--repo", str(repo)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("Thing: INCOMPATIBLE (2 earlier versions)\n  - Thing (vs ")


def test_not_a_git_repository_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, V1)
    assert main(["--repo", str(tmp_path)]) == 2
    assert "not a git repository" in capsys.readouterr().err


def test_missing_schema_directory_is_an_error(tmp_path: Path) -> None:
    assert main(["--repo", str(tmp_path)]) == 2
