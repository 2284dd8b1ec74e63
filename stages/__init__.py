"""llm-forge stages: one module per pipeline stage, run as `python -m stages.<name>`."""
