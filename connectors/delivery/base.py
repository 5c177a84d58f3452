"""The delivery connector interface: one async ``send`` plus ``aclose``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from schemas.models import DeliveryRequest

__all__ = ["DeliveryConnector", "SendResult"]


@dataclass(frozen=True, slots=True)
class SendResult:
    """What a channel said when it accepted a message.

    Attributes:
        provider_message_id: The channel's id for the message (SMTP Message-ID, provider SID).
    """

    provider_message_id: str | None = None


class DeliveryConnector(ABC):
    """Hands one DeliveryRequest to a channel (in the spirit of httpx's AsyncBaseTransport).

    Implementations raise ``connectors.errors.DeliveryError`` with ``retriable`` set; any other
    exception is treated as retriable by the delivery stage.
    """

    name: str = "connector"

    @abstractmethod
    async def send(self, request: DeliveryRequest) -> SendResult:
        """Deliver ``request``; return once the channel has accepted it."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook with a default
        """Release connections and files. The default does nothing."""
