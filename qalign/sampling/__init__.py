"""Running chains: the one step function shared by every entry point, and the local runner."""
