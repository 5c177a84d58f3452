"""Test doubles and loopback servers shared by the unit, integration and benchmark suites."""

__all__: list[str] = []
