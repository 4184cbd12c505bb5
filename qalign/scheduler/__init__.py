"""Scheduling sweeps: creation, dispatch of chain steps, resume, reaping, local execution."""
