"""Textual TUI: live dashboard and replay; it only consumes trace records."""
