"""What leaves a session for people and other tools: text and HTML reports, file exports, live /metrics."""
