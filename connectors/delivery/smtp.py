"""The ``smtp`` connector: one e-mail per delivery through an SMTP relay (aiosmtplib)."""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from pathlib import Path

import aiosmtplib

from connectors.delivery.base import DeliveryConnector, SendResult
from connectors.delivery.registry import OptionReader, OptionValue, register_connector
from connectors.errors import DeliveryError
from schemas.models import DeliveryRequest

_NOT_ATEXT = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")


def _local_part(delivery_id: str) -> str:
    """``delivery_id`` made safe as the left part of a Message-ID (RFC 5322 dot-atom text)."""
    return _NOT_ATEXT.sub("-", delivery_id).strip(".") or "delivery"


__all__ = ["DELIVERY_ID_HEADER", "SmtpConnector", "parse_address"]

log = logging.getLogger(__name__)

DELIVERY_ID_HEADER = "X-Switchboard-Delivery-Id"
_TAG = re.compile(r"<[^>]+>")


def parse_address(value: str) -> str | None:
    """Return the addr-spec of ``value`` (``a@b.c`` or ``Name <a@b.c>``), or None if invalid.

    A light check in the spirit of RFC 5322 section 3.4: one ``@`` with a non-empty local part
    and domain, no whitespace and no CR/LF (header injection) anywhere in ``value``.
    """
    if "\r" in value or "\n" in value:
        return None
    _, addr = parseaddr(value)
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or any(ch.isspace() for ch in addr):
        return None
    return addr


@register_connector("smtp")
class SmtpConnector(DeliveryConnector):
    """Sends each delivery as a MIME message (RFC 5322) over SMTP (RFC 5321).

    Connects per send: one connection, EHLO, optional STARTTLS/AUTH, MAIL/RCPT/DATA, QUIT. That
    costs a round trip or two per message but needs no connection health checks or locking and
    survives relay restarts; a pooled client can replace it behind the same interface.

    Errors: an invalid recipient is refused before connecting (``retriable=False``). Replies
    with a 5yz code (permanent, RFC 5321 section 4.2.1) are not retriable; 4yz replies,
    timeouts and connection failures are. A refused recipient is retriable only when every
    refusal is 4yz (e.g. 450 greylisting).
    """

    name = "smtp"

    def __init__(
        self,
        *,
        sender: str,
        host: str = "127.0.0.1",
        port: int = 25,
        username: str | None = None,
        password: str | None = None,
        start_tls: bool = False,
        use_tls: bool = False,
        timeout_s: float = 10.0,
        subject_default: str = "",
        local_hostname: str | None = None,
    ) -> None:
        """Create a connector; see ``from_options`` for the meaning of each argument.

        Raises:
            ValueError: ``sender`` is not an address, or both TLS modes or a bad timeout given.
        """
        sender_addr = parse_address(sender)
        if sender_addr is None:
            raise ValueError(
                f"connector 'smtp': option 'sender' is not an e-mail address: {sender!r}"
            )
        if start_tls and use_tls:
            raise ValueError("connector 'smtp': options 'start_tls' and 'use_tls' are exclusive")
        if timeout_s <= 0:
            raise ValueError(f"connector 'smtp': option 'timeout_s' must be > 0, got {timeout_s}")
        self._sender, self._sender_addr = sender, sender_addr
        self._host, self._port = host, port
        self._username, self._password = username, password
        self._start_tls, self._use_tls = start_tls, use_tls
        self._timeout_s = timeout_s
        self._subject_default = subject_default
        self._local_hostname = local_hostname

    @classmethod
    def from_options(cls, options: Mapping[str, OptionValue], *, data_dir: Path) -> SmtpConnector:
        """Build from options.

        Options: ``sender`` (From, required), ``host`` (127.0.0.1), ``port`` (25), ``username``
        and ``password`` (AUTH when both given), ``start_tls`` (False), ``use_tls`` (False,
        implicit TLS), ``timeout_s`` (10 s per SMTP operation), ``subject_default`` (""),
        ``local_hostname`` (EHLO name; default the machine's FQDN). ``data_dir`` is unused.

        Raises:
            ValueError: An option is unknown, missing, of the wrong type or invalid.
        """
        reader = OptionReader(cls.name, options)
        connector = cls(
            sender=reader.require_str("sender"),
            host=reader.get_str("host", "127.0.0.1"),
            port=reader.get_int("port", 25),
            username=reader.optional_str("username"),
            password=reader.optional_str("password"),
            start_tls=reader.get_bool("start_tls", False),
            use_tls=reader.get_bool("use_tls", False),
            timeout_s=reader.get_float("timeout_s", 10.0),
            subject_default=reader.get_str("subject_default", ""),
            local_hostname=reader.optional_str("local_hostname"),
        )
        reader.check_unknown()
        return connector

    def build_message(self, request: DeliveryRequest) -> EmailMessage:
        """Build the RFC 5322 message for ``request`` (text, or text + HTML alternative)."""
        msg = EmailMessage()
        msg["From"] = self._sender
        msg["To"] = request.recipient
        subject = " ".join((request.subject or self._subject_default).split())
        if subject:
            msg["Subject"] = subject
        msg["Date"] = format_datetime(datetime.now(UTC))
        # Derived from the delivery id (RFC 5322 §3.6.4): a delivery re-sent after a crash carries
        # the same Message-ID, which mail stores and clients use to drop the duplicate.
        domain = self._sender_addr.rpartition("@")[2] or "switchboard.local"
        msg["Message-ID"] = f"<{_local_part(request.delivery_id)}@{domain}>"
        msg[DELIVERY_ID_HEADER] = request.delivery_id
        if request.content_type.split(";")[0].strip().lower() == "text/html":
            msg.set_content(html.unescape(_TAG.sub("", request.content)))
            msg.add_alternative(request.content, subtype="html")
        else:
            msg.set_content(request.content)
        return msg

    async def send(self, request: DeliveryRequest) -> SendResult:
        """Send ``request`` to ``request.recipient``; return the Message-ID (with ``<>``).

        Raises:
            DeliveryError: The recipient is invalid or the relay refused or could not be
                reached; ``retriable`` as described on the class.
        """
        rcpt = parse_address(request.recipient)
        if rcpt is None:
            raise DeliveryError(
                f"smtp: recipient {request.recipient!r} is not an e-mail address", retriable=False
            )
        msg = self.build_message(request)
        auth = self._username is not None and self._password is not None
        try:
            await aiosmtplib.send(
                msg,
                sender=self._sender_addr,
                recipients=[rcpt],
                hostname=self._host,
                port=self._port,
                username=self._username if auth else None,
                password=self._password if auth else None,
                start_tls=self._start_tls,
                use_tls=self._use_tls,
                timeout=self._timeout_s,
                local_hostname=self._local_hostname,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            transient = all(400 <= r.code < 500 for r in exc.recipients)
            detail = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            raise DeliveryError(f"smtp: recipient refused: {detail}", retriable=transient) from exc
        except aiosmtplib.SMTPResponseException as exc:
            permanent = 500 <= exc.code < 600
            raise DeliveryError(
                f"smtp: {type(exc).__name__} {exc.code} {exc.message}", retriable=not permanent
            ) from exc
        except aiosmtplib.SMTPNotSupported as exc:
            raise DeliveryError(f"smtp: {exc.message}", retriable=False) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryError(
                f"smtp: {self._host}:{self._port} unreachable: {type(exc).__name__}: {exc}",
                retriable=True,
            ) from exc
        message_id = str(msg["Message-ID"])
        log.debug("smtp: sent delivery %s as %s", request.delivery_id, message_id)
        return SendResult(provider_message_id=message_id)
