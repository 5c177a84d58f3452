"""The stages (agents, in Faust terms): thin wiring of topics to the pure processors."""
