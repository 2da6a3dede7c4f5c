"""Fakes at vendor boundaries (pynvml); everything else in the tests is real."""
