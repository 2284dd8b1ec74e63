"""Scores a HumanEval completion by running its unit tests in the sandbox (humaneval_sandbox.yaml):
bubblewrap's, or none where evaluate's `code_sandbox` says unsafe_no_sandbox (`sandbox.using`)."""

from __future__ import annotations

from stages.common.sandbox import run_program

# Seconds and MB per program: HumanEval's reference solutions run in well under a second and a
# few MB; these bounds only stop runaway completions.
TIMEOUT_S = 10.0
MEMORY_MB = 512


def program(doc: dict, completion: str) -> str:
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    result = run_program(program(doc, results[0]), timeout=TIMEOUT_S, memory_mb=MEMORY_MB)
    return {"pass@1": float(result.passed)}
