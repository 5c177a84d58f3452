"""Wiring: the Faust app, agents, settings, metrics, embedded stack and the CLI."""
