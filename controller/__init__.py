"""The tofu-qemu controller: reconciles QemuVM specs into QEMU processes.

It is a client of the spec store in `api`; it also hosts the composition root (`cli`), since
only this package may import both halves.
"""
