"""Platform specifics (CPU harness)."""
