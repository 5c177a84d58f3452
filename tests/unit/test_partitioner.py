"""``streams.transport.key_partition``: the Java client's partition of a key, remembered."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from streams.transport import key_partition

# org.apache.kafka.common.utils.UtilsTest.testMurmur2: (key, signed murmur2 hash).
JAVA_CASES = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"abc", 479470107),
]


def test_partitions_match_the_java_client_hashes() -> None:
    partitions = list(range(7))
    for key, signed in JAVA_CASES:
        assert key_partition(key, partitions, partitions) == (signed & 0x7FFFFFFF) % 7


@given(key=st.binary(max_size=64), count=st.integers(min_value=1, max_value=64))
def test_same_partition_as_aiokafkas_default_partitioner(key: bytes, count: int) -> None:
    partitions = list(range(count))
    expected = DefaultPartitioner()(key, partitions, partitions)
    assert key_partition(key, partitions, partitions) == expected
    assert key_partition(key, partitions, partitions) == expected  # remembered hash


def test_a_null_key_goes_to_an_available_partition() -> None:
    chosen = {key_partition(None, [0, 1, 2, 3], [2]) for _ in range(50)}
    assert chosen == {2}
    assert {key_partition(None, [0, 1], []) for _ in range(200)} == {0, 1}
