"""qalign: exact, distributed QAlign (MCMC test-time alignment) for served language models."""

__version__ = "0.1.0"
