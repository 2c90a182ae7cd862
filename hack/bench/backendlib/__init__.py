"""The parts of hack/bench/backend: the server under test and its CPU (common), Terraform apply
against the local backend (apply), request latency under concurrency (latency) and a large
state written then listed (big_state)."""
