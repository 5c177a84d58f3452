"""Wiring: the worker (a batch consumer per stage, the changelog table), the stages, settings,
metrics, the embedded stack and the CLI."""
