"""Conformance cases (one module per area) and the pytest plugin that runs them."""
