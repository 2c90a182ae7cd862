"""Telemetry: traces (OpenTelemetry) and metrics (Prometheus), shared by the API and the controller."""
