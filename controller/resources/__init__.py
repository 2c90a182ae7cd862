"""Host resources a VM holds: forwarded ports and disk files. Allocate, release, find leaks."""
