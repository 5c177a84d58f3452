"""Pure stage logic: no I/O, no Kafka client."""
