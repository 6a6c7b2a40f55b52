"""Unit constants, once: binary and decimal byte multiples, FLOP/s prefixes, seconds.

Quantities are stored in base units (bytes, FLOPs, seconds) everywhere; these convert human
units at the edges (catalogue files, CLI flags, reports)."""

KIB = 1024
MIB = 1024**2
GIB = 1024**3
GB = 1000**3
TERA = 1e12
SECONDS_PER_HOUR = 3600
