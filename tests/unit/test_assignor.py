"""The co-partitioned assignor: range assignment over members ordered by worker id."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from hypothesis import given
from hypothesis import strategies as st

from streams.assignor import CoPartitionedAssignor, range_layout


@dataclass
class Cluster:
    """What an assignor reads of aiokafka's ClusterMetadata: partitions per topic."""

    partitions: dict[str, int] = field(default_factory=dict)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        count = self.partitions.get(topic)
        return None if count is None else set(range(count))


def _members(
    workers: dict[str, str], topics: list[str]
) -> dict[str, ConsumerProtocolMemberMetadata]:
    """member id → metadata as each member's own assignor sends it (worker id as user_data)."""
    return {
        member: CoPartitionedAssignor(worker).metadata(topics) for member, worker in workers.items()
    }


def _owned(assignment: object) -> dict[str, list[int]]:
    return {topic: list(partitions) for topic, partitions in assignment.assignment}  # type: ignore[attr-defined]


def test_each_worker_gets_the_same_partition_numbers_in_every_group() -> None:
    cluster = Cluster({"t.conversations": 8, "t.llm.requests": 8, "t.llm.responses": 8})
    # The coordinator's member ids sort in a different worker order in each group.
    groups = {
        "t.conversations": {"m-a": "worker-1", "m-b": "worker-0", "m-c": "worker-2"},
        "t.llm.requests": {"m-c": "worker-1", "m-a": "worker-0", "m-b": "worker-2"},
        "t.llm.responses": {"m-b": "worker-1", "m-c": "worker-0", "m-a": "worker-2"},
    }
    by_worker: dict[str, list[list[int]]] = {}
    for topic, workers in groups.items():
        result = CoPartitionedAssignor("any").assign(cluster, _members(workers, [topic]))
        for member, assignment in result.items():
            by_worker.setdefault(workers[member], []).append(_owned(assignment)[topic])
    assert by_worker == {
        "worker-0": [[0, 1, 2]] * 3,
        "worker-1": [[3, 4, 5]] * 3,
        "worker-2": [[6, 7]] * 3,
    }
    # aiokafka's range assignor, by member id, does not (what the worker used before).
    ranged: dict[str, list[list[int]]] = {}
    for topic, workers in groups.items():
        result = RangePartitionAssignor.assign(cluster, _members(workers, [topic]))
        for member, assignment in result.items():
            ranged.setdefault(workers[member], []).append(_owned(assignment)[topic])
    assert ranged["worker-0"] != [[0, 1, 2]] * 3


def test_a_stage_with_two_inputs_gets_the_same_numbers_of_both() -> None:
    cluster = Cluster({"t.conversations": 4, "t.llm.responses": 4})
    workers = {"m-z": "worker-0", "m-a": "worker-1"}
    result = CoPartitionedAssignor("x").assign(
        cluster, _members(workers, ["t.conversations", "t.llm.responses"])
    )
    assert _owned(result["m-z"]) == {"t.conversations": [0, 1], "t.llm.responses": [0, 1]}
    assert _owned(result["m-a"]) == {"t.conversations": [2, 3], "t.llm.responses": [2, 3]}


def test_equal_worker_ids_fall_back_to_member_order_and_still_cover_every_partition() -> None:
    cluster = Cluster({"t": 5})
    result = CoPartitionedAssignor("x").assign(
        cluster, _members({"m-2": "same", "m-1": "same"}, ["t"])
    )
    assert _owned(result["m-1"]) == {"t": [0, 1, 2]}
    assert _owned(result["m-2"]) == {"t": [3, 4]}


def test_a_topic_without_metadata_is_left_out_and_a_member_may_get_nothing() -> None:
    cluster = Cluster({"t": 1})
    workers = {"m-1": "worker-0", "m-2": "worker-1"}
    result = CoPartitionedAssignor("x").assign(cluster, _members(workers, ["t", "gone"]))
    assert _owned(result["m-1"]) == {"t": [0]}
    assert _owned(result["m-2"]) == {"t": []}


def test_the_subscription_carries_the_worker_id_under_kafkas_range_protocol() -> None:
    metadata = CoPartitionedAssignor("pod-7").metadata(["a", "b"])
    assert metadata.subscription == ["a", "b"]
    assert metadata.user_data == b"pod-7"
    # the same protocol name as the range-only release: a group can mix both, either way
    assert CoPartitionedAssignor.name == RangePartitionAssignor.name == "range"
    encoded = metadata.encode()  # what JoinGroup carries, decoded by the leader
    assert ConsumerProtocolMemberMetadata.decode(encoded).user_data == b"pod-7"


def test_a_member_of_the_previous_release_sorts_first_and_nothing_is_left_out() -> None:
    cluster = Cluster({"t": 5})
    members = _members({"m-0": "worker-0", "m-9": "worker-1"}, ["t"])
    members["m-5"] = RangePartitionAssignor.metadata(["t"])  # empty user_data
    result = CoPartitionedAssignor("x").assign(cluster, members)
    assert {m: _owned(a)["t"] for m, a in result.items()} == {
        "m-5": [0, 1],
        "m-0": [2, 3],
        "m-9": [4],
    }


def test_the_leader_warns_when_two_workers_share_an_id(caplog: pytest.LogCaptureFixture) -> None:
    members = _members({"m-1": "pod", "m-2": "pod", "m-3": "other"}, ["t"])
    CoPartitionedAssignor("x").assign(Cluster({"t": 3}), members)
    assert "members share a worker id (pod)" in caplog.text


@given(
    partitions=st.integers(1, 40),
    members=st.integers(1, 9),
)
def test_the_layout_is_kafkas_range_layout(partitions: int, members: int) -> None:
    """Same result as aiokafka's range assignor when worker order equals member-id order."""
    names = [f"m-{i:02d}" for i in range(members)]
    cluster = Cluster({"t": partitions})
    metadata = _members({n: n for n in names}, ["t"])
    ranged = {
        m: _owned(a)["t"] for m, a in RangePartitionAssignor.assign(cluster, metadata).items()
    }
    ours = CoPartitionedAssignor("x").assign(cluster, metadata)
    assert {m: _owned(a)["t"] for m, a in ours.items()} == ranged
    assert range_layout(list(range(partitions)), names) == ranged


@pytest.mark.parametrize(("partitions", "expected"), [(5, [3, 2]), (1, [1, 0]), (4, [2, 2])])
def test_range_layout_gives_the_first_members_the_extra_partitions(
    partitions: int, expected: list[int]
) -> None:
    layout = range_layout(list(range(partitions)), ["a", "b"])
    assert [len(layout["a"]), len(layout["b"])] == expected
    assert layout["a"] + layout["b"] == list(range(partitions))
