"""Shared helpers of the test suite (imported as `support.*`; tests/ is on sys.path)."""
