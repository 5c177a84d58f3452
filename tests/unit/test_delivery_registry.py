"""Unit tests of connectors.delivery.registry: names, built-ins, entry points, option errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from connectors.delivery.base import DeliveryConnector, SendResult
from connectors.delivery.outbox import OutboxConnector
from connectors.delivery.registry import (
    OptionReader,
    OptionValue,
    UnknownConnectorError,
    build_connector,
    known_connectors,
    register_connector,
    unregister_connector,
)
from connectors.delivery.smtp import SmtpConnector
from schemas.models import DeliveryRequest


class _Null(DeliveryConnector):
    name = "null"

    def __init__(self, tag: str) -> None:
        self.tag = tag

    @classmethod
    def from_options(cls, options: Mapping[str, OptionValue], *, data_dir: Path) -> _Null:
        reader = OptionReader(cls.name, options)
        tag = reader.get_str("tag", "none")
        reader.check_unknown()
        return cls(tag)

    async def send(self, request: DeliveryRequest) -> SendResult:
        return SendResult(provider_message_id=f"null:{self.tag}")


@pytest.fixture
def unique_name() -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    unregister_connector(name)


def test_builtin_connectors_are_listed_by_name() -> None:
    names = known_connectors()
    assert "outbox" in names
    assert "smtp" in names
    assert names == sorted(names)


def test_builtin_module_is_imported_on_first_lookup_in_a_fresh_interpreter(
    tmp_path: Path,
) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from connectors.delivery.registry import build_connector\n"
        "assert 'connectors.delivery.smtp' not in sys.modules\n"
        "c = build_connector('smtp', {'sender': 'a@example.com'}, data_dir=Path('.'))\n"
        "print(type(c).__module__, type(c).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["connectors.delivery.smtp", "SmtpConnector"]


def test_build_outbox_by_name_uses_data_dir_for_the_default_path(tmp_path: Path) -> None:
    connector = build_connector("outbox", {}, data_dir=tmp_path)
    assert isinstance(connector, OutboxConnector)
    assert connector.path == tmp_path / "outbox.jsonl"


def test_build_smtp_by_name_with_typed_and_string_options(tmp_path: Path) -> None:
    connector = build_connector(
        "smtp",
        {"sender": "Bot <bot@example.com>", "port": "2525", "start_tls": "yes", "timeout_s": 3},
        data_dir=tmp_path,
    )
    assert isinstance(connector, SmtpConnector)


def test_unknown_name_raises_key_error_listing_known_names(tmp_path: Path) -> None:
    with pytest.raises(KeyError) as info:
        build_connector("carrier-pigeon", {}, data_dir=tmp_path)
    assert isinstance(info.value, UnknownConnectorError)
    assert "carrier-pigeon" in str(info.value)
    assert "outbox" in str(info.value)
    assert "smtp" in str(info.value)


@pytest.mark.parametrize(
    ("options", "option_name"),
    [
        ({"port": "abc", "sender": "a@example.com"}, "port"),
        ({"port": True, "sender": "a@example.com"}, "port"),
        ({"host": "localhost"}, "sender"),
        ({"sender": "not an address"}, "sender"),
        ({"sender": "a@example.com", "start_tls": "maybe"}, "start_tls"),
        ({"sender": "a@example.com", "timeout_s": "soon"}, "timeout_s"),
        ({"sender": "a@example.com", "timeout_s": 0}, "timeout_s"),
        ({"sender": "a@example.com", "hots": "x"}, "hots"),
        ({"sender": "a@example.com", "start_tls": True, "use_tls": True}, "use_tls"),
    ],
)
def test_bad_smtp_options_raise_value_error_naming_the_option(
    tmp_path: Path, options: dict[str, OptionValue], option_name: str
) -> None:
    with pytest.raises(ValueError, match=option_name):
        build_connector("smtp", options, data_dir=tmp_path)


def test_unknown_outbox_option_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'outbox'.*pth.*accepted: path"):
        build_connector("outbox", {"pth": "x.jsonl"}, data_dir=tmp_path)


def test_register_as_decorator_then_build(tmp_path: Path, unique_name: str) -> None:
    register_connector(unique_name)(_Null)
    connector = build_connector(unique_name, {"tag": "t1"}, data_dir=tmp_path)
    assert isinstance(connector, _Null)
    assert connector.tag == "t1"
    assert unique_name in known_connectors()


def test_register_a_plain_factory_function(tmp_path: Path, unique_name: str) -> None:
    seen: list[tuple[dict[str, OptionValue], Path]] = []

    def factory(options: Mapping[str, OptionValue], *, data_dir: Path) -> DeliveryConnector:
        seen.append((dict(options), data_dir))
        return _Null("from-factory")

    register_connector(unique_name, factory)
    connector = build_connector(unique_name, {"x": 1}, data_dir=tmp_path)
    assert isinstance(connector, _Null)
    assert connector.tag == "from-factory"
    assert seen == [({"x": 1}, tmp_path)]


def test_conflicting_registration_is_refused_unless_replace(
    tmp_path: Path, unique_name: str
) -> None:
    register_connector(unique_name)(_Null)
    register_connector(unique_name)(_Null)  # same factory again: no-op

    def other(options: Mapping[str, OptionValue], *, data_dir: Path) -> DeliveryConnector:
        return _Null("other")

    with pytest.raises(ValueError, match="already registered"):
        register_connector(unique_name, other)
    register_connector(unique_name, other, replace=True)
    connector = build_connector(unique_name, {}, data_dir=tmp_path)
    assert isinstance(connector, _Null)
    assert connector.tag == "other"


def test_unregistered_name_is_unknown_again(tmp_path: Path, unique_name: str) -> None:
    register_connector(unique_name)(_Null)
    unregister_connector(unique_name)
    with pytest.raises(UnknownConnectorError):
        build_connector(unique_name, {}, data_dir=tmp_path)


def test_third_party_connector_is_found_through_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unique_name: str
) -> None:
    module = f"sb_plugin_{uuid.uuid4().hex[:8]}"
    site = tmp_path / "site"
    (site / f"{module}-1.0.dist-info").mkdir(parents=True)
    (site / f"{module}-1.0.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n"
    )
    (site / f"{module}-1.0.dist-info" / "entry_points.txt").write_text(
        f"[switchboard.connectors]\n{unique_name} = {module}:PigeonConnector\n"
    )
    (site / f"{module}.py").write_text(
        textwrap.dedent(
            """
            from connectors.delivery.base import DeliveryConnector, SendResult

            class PigeonConnector(DeliveryConnector):
                name = "pigeon"

                def __init__(self, loft):
                    self.loft = loft

                @classmethod
                def from_options(cls, options, *, data_dir):
                    return cls(options.get("loft", str(data_dir)))

                async def send(self, request):
                    return SendResult(provider_message_id="coo")
            """
        )
    )
    assert unique_name not in known_connectors()
    monkeypatch.syspath_prepend(str(site))

    assert unique_name in known_connectors()
    connector = build_connector(unique_name, {"loft": "roof"}, data_dir=tmp_path)
    assert type(connector).__name__ == "PigeonConnector"
    assert connector.loft == "roof"  # type: ignore[attr-defined]  # plugin class, untyped here


def test_option_reader_converts_strings_and_rejects_wrong_types() -> None:
    reader = OptionReader(
        "demo", {"n": " 7 ", "f": "1.5", "b": "OFF", "s": 42, "flag": True, "empty": ""}
    )
    assert reader.get_int("n", 0) == 7
    assert reader.get_float("f", 0.0) == 1.5
    assert reader.get_bool("b", True) is False
    assert reader.get_str("s", "") == "42"
    assert reader.get_int("absent", 9) == 9
    with pytest.raises(ValueError, match="'flag' must be a string"):
        reader.optional_str("flag")
    with pytest.raises(ValueError, match="'empty' is required"):
        reader.require_str("empty")
    reader.check_unknown()  # everything was read
