"""LLM engines behind one interface (``connectors.llm.base.LLMEngine``)."""
