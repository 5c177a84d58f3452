"""Co-partitioned assignment: each worker gets the same partition numbers in every stage.

Every stage is a consumer group of its own (``<app_id>.<stage>``). aiokafka's range assignor
lays a topic's partitions out over the group's members sorted by **member id**, which the
group coordinator makes up for each member at its first join (``<client_id>-<uuid>``), so
the order differs from group to group: with two workers, partition
3 of the conversations topic may go to one worker and partition 3 of the LLM-requests topic
to the other. A turn then crosses between workers at every hop although its records keep one
key, and hence one partition number, on every topic (``streams.transport.key_partition``).

``CoPartitionedAssignor`` does the range assignment with the members sorted by **worker id**
instead, a name each member sends in its subscription's ``user_data`` and that every stage of
one worker shares. When every worker is in every stage's group and the topics have the same
number of partitions, each worker gets the same partition numbers in every group, as Kafka
Streams gives one task the same partition of each co-partitioned topic. A record a worker
produces for a key it owns is then consumed by that same worker, which keeps it encoded
(``schemas.codec.Codec``, ``remember``) and skips decoding it, and a stable worker id (a pod
name, ``SWITCHBOARD_WORKER_ID``) gives a restarted worker its partitions back.

Nothing depends on it for correctness: while the groups rebalance one after the other, or
with topics of different partition counts, a key's hops may run on different workers, as
with any assignor.

The protocol keeps the name ``range``: it is Kafka's range assignment, only with another
member order (as Kafka's own ``RangeAssignor`` orders static members by ``group.instance.id``,
KIP-345). Whichever member the coordinator elects leader, its assignment is a valid range
layout, so workers of the previous release (aiokafka's ``RangePartitionAssignor``, by member
id, sending empty ``user_data``) and of this one share a group in either order during a rolling
upgrade or a rollback; a member without a worker id sorts first. A second protocol name offered
beside ``range`` would not do: aiokafka 0.14.0 sends one JoinGroup request per assignor it is
given, the first offering only the first protocol (aio-libs/aiokafka#1168), and a range-only
member joining a group of such members is then refused (InconsistentGroupProtocol).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import defaultdict
from collections.abc import Iterable, Mapping

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

__all__ = ["CoPartitionedAssignor", "default_worker_id", "range_layout"]

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    """``<hostname>:<pid>``: unique among the workers running at one time, the same for every
    stage of one worker process. It changes when the worker restarts; set a stable one
    (``SWITCHBOARD_WORKER_ID``) for a restarted worker to get its partitions back."""
    return f"{socket.gethostname()}:{os.getpid()}"


def range_layout(partitions: list[int], members: list[str]) -> dict[str, list[int]]:
    """Split ``partitions`` into consecutive ranges over ``members`` in their given order;
    the first ``len(partitions) % len(members)`` members get one more (Kafka's range
    assignor, ``org.apache.kafka.clients.consumer.RangeAssignor``)."""
    each, extra = divmod(len(partitions), len(members))
    layout: dict[str, list[int]] = {}
    start = 0
    for i, member in enumerate(members):
        length = each + (1 if i < extra else 0)
        layout[member] = partitions[start : start + length]
        start += length
    return layout


class CoPartitionedAssignor(AbstractPartitionAssignor):  # type: ignore[misc]  # untyped
    """Range assignment over the members ordered by worker id (see the module docstring).

    Args:
        worker_id: This worker's name; sent to the group leader in the member's
            subscription ``user_data`` (UTF-8). Members with equal ids (a misconfiguration)
            are ordered by member id among themselves.
    """

    name = "range"
    """Kafka's range protocol (see the module docstring)."""
    version = 0

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        """This member's subscription, with its worker id as ``user_data``."""
        return ConsumerProtocolMemberMetadata(self.version, list(topics), self.worker_id.encode())

    def assign(
        self,
        cluster: ClusterMetadata,
        members: Mapping[str, ConsumerProtocolMemberMetadata],
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        """Range-assign each subscribed topic over its members sorted by (worker id, member
        id); run by the group's leader. Topics without partition metadata are left out, as
        aiokafka's range assignor does."""
        ids = {m: bytes(members[m].user_data or b"") for m in members}
        order = sorted(members, key=lambda m: (ids[m], m))
        named = [worker for worker in ids.values() if worker]
        if len(set(named)) < len(named):
            log.warning(
                "members share a worker id (%s): each worker's partitions may differ from one "
                "stage to the next; give every worker its own SWITCHBOARD_WORKER_ID",
                ", ".join(
                    sorted({w.decode(errors="replace") for w in named if named.count(w) > 1})
                ),
            )
        per_topic: dict[str, list[str]] = defaultdict(list)
        for member in order:
            for topic in members[member].subscription:
                per_topic[topic].append(member)
        assignment: dict[str, dict[str, list[int]]] = defaultdict(dict)
        for topic, subscribed in per_topic.items():
            partitions = cluster.partitions_for_topic(topic)
            if partitions is None:
                continue
            for member, owned in range_layout(sorted(partitions), subscribed).items():
                assignment[member][topic] = owned
        return {
            member: ConsumerProtocolMemberAssignment(
                self.version, sorted(assignment[member].items()), b""
            )
            for member in members
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        """Nothing to remember between assignments."""
