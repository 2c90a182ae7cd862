"""The QEMU runtime: argv building (pure), processes, the QMP adapter and the accelerator probe."""
