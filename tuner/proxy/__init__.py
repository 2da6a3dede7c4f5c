"""The OpenAI-compatible proxy in front of a serving engine (``tuner proxy``)."""
