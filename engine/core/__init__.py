"""The driver core, without torch: requests, the scheduler and its speculation policy, the
block manager, sampling parameters, configuration and the wire structs (docs/architecture.md)."""
