"""The smtp connector against a real aiosmtpd server on loopback."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from connectors.delivery.registry import build_connector
from connectors.delivery.smtp import DELIVERY_ID_HEADER, SmtpConnector
from connectors.errors import DeliveryError
from schemas.models import Channel, DeliveryRequest, utcnow
from streams.embedded import find_free_port

pytestmark = pytest.mark.integration

SENDER = "Switchboard <noreply@switchboard.test>"


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


class RecordingHandler:
    """Stores accepted envelopes; refuses recipients and data by address prefix."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._lock = threading.Lock()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.startswith("refused"):
            return "550 5.1.1 No such user here"
        if address.startswith("busy"):
            return "450 4.2.1 Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        rcpts: list[str] = envelope.rcpt_tos
        if any(r.startswith("spam") for r in rcpts):
            return "554 5.7.1 Message rejected as spam"
        raw, mail_from = envelope.content, envelope.mail_from
        assert isinstance(raw, bytes)  # decode_data=False (the Controller default)
        assert mail_from is not None
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._lock:
            self.received.append(Received(mail_from, list(rcpts), message))
        return "250 Message accepted for delivery"

    def for_recipient(self, address: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if address in r.rcpt_tos]


@pytest.fixture(scope="module")
def recording_smtp() -> Iterator[tuple[RecordingHandler, int]]:
    handler = RecordingHandler()
    port = find_free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
async def connector(
    recording_smtp: tuple[RecordingHandler, int], tmp_path: Path
) -> AsyncIterator[SmtpConnector]:
    _, port = recording_smtp
    built = build_connector(
        "smtp",
        {
            "sender": SENDER,
            "port": port,
            "subject_default": "A message from Switchboard",
            "local_hostname": "worker.switchboard.test",
            "timeout_s": 5,
        },
        data_dir=tmp_path,
    )
    assert isinstance(built, SmtpConnector)
    yield built
    await built.aclose()


def make_request(recipient: str, **changes: object) -> DeliveryRequest:
    now = utcnow()
    fields: dict[str, object] = {
        "delivery_id": f"d-{recipient}",
        "message_id": "m-1",
        "tenant": "acme",
        "channel": Channel.EMAIL,
        "recipient": recipient,
        "subject": "Your code",
        "content": "Your one-time code is 123456.",
        "origin_created_at": now,
        "created_at": now,
    }
    fields.update(changes)
    return DeliveryRequest.model_validate(fields)


async def test_delivery_arrives_with_envelope_headers_and_body(
    connector: SmtpConnector, recording_smtp: tuple[RecordingHandler, int]
) -> None:
    handler, _ = recording_smtp
    result = await connector.send(make_request("alice@example.com", delivery_id="del-42"))

    [got] = handler.for_recipient("alice@example.com")
    assert got.mail_from == "noreply@switchboard.test"
    assert got.rcpt_tos == ["alice@example.com"]
    msg = got.message
    assert msg["From"] == SENDER
    assert msg["To"] == "alice@example.com"
    assert msg["Subject"] == "Your code"
    assert msg[DELIVERY_ID_HEADER] == "del-42"
    assert msg["Date"] is not None
    assert msg["Message-ID"] == result.provider_message_id
    assert str(result.provider_message_id).endswith("@switchboard.test>")
    body = msg.get_body(("plain",))
    assert body is not None
    assert body.get_content().strip() == "Your one-time code is 123456."


async def test_missing_subject_uses_subject_default(
    connector: SmtpConnector, recording_smtp: tuple[RecordingHandler, int]
) -> None:
    handler, _ = recording_smtp
    await connector.send(make_request("nosubject@example.com", subject=None))
    [got] = handler.for_recipient("nosubject@example.com")
    assert got.message["Subject"] == "A message from Switchboard"


async def test_html_content_is_sent_as_html_alternative_with_text_fallback(
    connector: SmtpConnector, recording_smtp: tuple[RecordingHandler, int]
) -> None:
    handler, _ = recording_smtp
    page = "<p>Hello <b>Bob</b> &amp; team</p>"
    await connector.send(make_request("bob@example.com", content=page, content_type="text/html"))
    [got] = handler.for_recipient("bob@example.com")
    assert got.message.get_content_type() == "multipart/alternative"
    html_part = got.message.get_body(("html",))
    text_part = got.message.get_body(("plain",))
    assert html_part is not None
    assert text_part is not None
    assert html_part.get_content().strip() == page
    assert text_part.get_content().strip() == "Hello Bob & team"


async def test_refused_recipient_raises_non_retriable_error(connector: SmtpConnector) -> None:
    with pytest.raises(DeliveryError) as info:
        await connector.send(make_request("refused@example.com"))
    assert info.value.retriable is False
    assert "550" in str(info.value)


async def test_temporarily_refused_recipient_is_retriable(connector: SmtpConnector) -> None:
    with pytest.raises(DeliveryError) as info:
        await connector.send(make_request("busy@example.com"))
    assert info.value.retriable is True
    assert "450" in str(info.value)


async def test_permanent_data_rejection_is_not_retriable(
    connector: SmtpConnector, recording_smtp: tuple[RecordingHandler, int]
) -> None:
    handler, _ = recording_smtp
    with pytest.raises(DeliveryError) as info:
        await connector.send(make_request("spam@example.com"))
    assert info.value.retriable is False
    assert "554" in str(info.value)
    assert handler.for_recipient("spam@example.com") == []


@pytest.mark.parametrize("recipient", ["not-an-address", "+15551234567", "a@b.c\r\nBcc: x@y.z"])
async def test_invalid_recipient_is_refused_before_connecting(recipient: str) -> None:
    # nothing listens on this port: connecting would give a *retriable* error instead
    connector = SmtpConnector(sender=SENDER, port=find_free_port(), timeout_s=1)
    with pytest.raises(DeliveryError, match="not an e-mail address") as info:
        await connector.send(make_request(recipient))
    assert info.value.retriable is False


async def test_server_down_raises_retriable_error() -> None:
    port = find_free_port()
    connector = SmtpConnector(sender=SENDER, port=port, timeout_s=2)
    with pytest.raises(DeliveryError) as info:
        await connector.send(make_request("carol@example.com"))
    assert info.value.retriable is True
    assert str(port) in str(info.value)


async def test_silent_server_times_out_with_retriable_error() -> None:
    async def never_greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # hold the connection open without the 220 greeting
        writer.close()

    server = await asyncio.start_server(never_greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        connector = SmtpConnector(sender=SENDER, port=port, timeout_s=0.3)
        with pytest.raises(DeliveryError) as info:
            await connector.send(make_request("dave@example.com"))
        assert info.value.retriable is True
        assert "Timeout" in str(info.value)
    finally:
        server.close()
        await server.wait_closed()
