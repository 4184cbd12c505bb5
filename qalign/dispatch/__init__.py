"""Dispatchers carry (chain, step) hints to whatever takes steps.

The database stays the source of truth: a lost hint is recovered by `resume` or the reaper, a
duplicate is harmless. `base` holds the interface, `inprocess` the one `qalign run` uses and
`celery` the broker one (with the Celery app factory, which knows no task code).
"""
