"""Evaluation: benchmark suites and their adapters, run through batch prediction."""
