"""Metrics and dashboard over HTTP (twisted.web): ``/metrics``, ``/stats``, ``/``."""
