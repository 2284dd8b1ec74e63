"""The columns of the evaluation table by name: evaluate fills them, the gate and the retrain flow
read them from `reports/evaluate/metrics.json`."""

from __future__ import annotations

PERPLEXITY, INSTRUCTION_LOSS, JUDGE_SCORE, PROXY_REWARD, PAIRWISE = (
    "perplexity", "instruction_loss", "judge_score", "proxy_reward", "pairwise_accuracy")
LOWER_IS_BETTER = (PERPLEXITY, INSTRUCTION_LOSS)
# The scorers of the rows' answers, each a row of its own (its pairwise accuracy on the test pairs):
# row -> (the `paths` key of its folder, the column it fills in every model row). The judge first:
# what we believe; the proxy: what RL optimized.
SCORERS = {"judge": ("judge", JUDGE_SCORE), "proxy": ("reward", PROXY_REWARD)}
WIN_RATE = {JUDGE_SCORE: "judge_win_rate", PROXY_REWARD: "proxy_win_rate"}
METRIC_NAMES = {PERPLEXITY: "token perplexity", INSTRUCTION_LOSS: "answer-token loss",
                JUDGE_SCORE: "judge's mean score", PROXY_REWARD: "proxy's mean reward", PAIRWISE: "pairwise acc"}
