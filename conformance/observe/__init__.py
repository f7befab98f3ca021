"""Observing the wire: decoding captures and judging what they show."""
