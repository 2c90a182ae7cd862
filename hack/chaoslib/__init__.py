"""The parts of hack/chaos, one job each; hack/chaos is the entry point (its docstring is the manual)."""
