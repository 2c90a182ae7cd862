"""Test support that ships with the package: builders of the documents tofu-qemu accepts
(tfstate.py) and the one way to wait for a condition (waiting.py).

It lives under `api/` (installed), not under `tests/` (not installed), for two readers:
- the tools in `hack/` (chaos, benchmarks) build the same states the tests do, and a tool must
  not import the test suite;
- users writing their own tests against a tofu-qemu server need Terraform-shaped states too,
  the way httpx ships `MockTransport` for its users' tests.
The builders are pure (no I/O): see the "Pure modules" import contract in pyproject.toml.
"""
