"""The parts of hack/build-guest: shared constants and helpers (common), the Debian packages and
what is unpacked from them (debs), the guest's own scripts (scripts), and the initramfs and
root filesystem written from the tree (images)."""
