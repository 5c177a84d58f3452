"""I/O behind small async interfaces: delivery channels, LLM engines, Redis stores."""
