"""The library entry points, one per command: estimate, plan, compare, validate. Each takes what
the command takes (by its flag names) and returns the object the command renders, so that a
notebook gets exactly what `nvfree <command>` prints. The work lives below (planner/, validate.py);
this module only names it."""

from estimator.planner.estimate import estimate

__all__ = ["estimate"]
