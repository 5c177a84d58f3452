"""Avro contracts (``avro/*.avsc``), their pydantic models and the codec."""
