"""The `tofu-qemu` client commands (get, describe, logs, restart, ...): kubectl for QemuVMs."""
