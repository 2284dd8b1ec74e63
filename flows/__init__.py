"""Prefect flows that run the DVC pipeline: DVC decides what is stale, Prefect schedules."""
