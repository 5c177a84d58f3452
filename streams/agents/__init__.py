"""Faust agents: thin wiring of topics to the pure processors (one module per stage)."""
