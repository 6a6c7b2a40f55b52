"""Rendering: the only place with display units (GiB for memory; GB/s and TFLOP/s, decimal,
for vendor rates) and rich tables."""
