"""A chat turn that arrives by e-mail is answered by e-mail through a real SMTP server."""

from __future__ import annotations

import asyncio
import email
from email import policy
from typing import Any

import pytest

from streams.replay import replay
from streams.stack import EmbeddedStack

pytestmark = pytest.mark.integration


async def test_email_turn_is_answered_over_smtp_with_recipient_subject_and_body(
    stack: EmbeddedStack, smtp_server: tuple[str, int, list[Any]]
) -> None:
    _, _, received = smtp_server
    sender = "alice.smtp-test@example.com"
    line = {
        "tenant": "mail",
        "channel": "email",
        "sender": sender,
        "subject": "Broken laptop",
        "content": "My laptop screen is black.",
    }
    result = await replay(
        stack.settings(), [line], timeout_s=60, on_progress=lambda *_: stack.check_workers()
    )
    (outcome,) = result.outcomes.values()
    assert outcome.report is not None, outcome.dead_letter
    assert outcome.report.status.value == "delivered"
    assert outcome.report.connector == "smtp"

    for _ in range(50):  # the report is written after the SMTP server accepted the message
        ours = [e for e in received if sender in e.rcpt_tos]
        if ours:
            break
        await asyncio.sleep(0.1)
    assert len(ours) == 1
    envelope = ours[0]
    assert envelope.rcpt_tos == [sender]
    assert "noreply@switchboard.local" in envelope.mail_from
    mail = email.message_from_bytes(envelope.content, policy=policy.default)
    assert mail["Subject"] == "Re: Broken laptop"
    # a long Message-ID is folded onto its own line (RFC 5322 CFWS): compare the msg-id
    assert mail["Message-ID"].strip() == outcome.report.provider_message_id
    body = mail.get_body(("plain",)).get_content()
    assert body.strip() == "Try adjusting brightness or connecting an external monitor."
