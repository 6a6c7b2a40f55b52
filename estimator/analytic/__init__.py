"""Pure analytic model: parameter counts, memory terms, FLOPs, time. Never imports torch."""
