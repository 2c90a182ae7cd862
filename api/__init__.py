"""The tofu-qemu API, as kubebuilder means it: QemuVM types, the spec store and the HTTP server.

Nothing in this package imports `controller`; the controller is a client of the store.
"""
