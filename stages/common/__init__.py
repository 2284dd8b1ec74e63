"""Helpers that more than one stage needs: config loading, file I/O, MLflow tracking, the runner."""
