"""Win rates of policy folders on evaluate's test prompts, under the judge and under the proxy reward model.

evaluate compares each row with the one it is set against; this compares any folders, in the order
given (each against the first), with the same prompts, answers and scorers as evaluate's
`judge_score` and `proxy_reward`: the ppo variants of a tuning run against sft without running the
whole stage.

    python -m bench.winrate_bench [--params params.yaml] models/sft models/ppo other/ppo
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from stages.common import stats
    from stages.common.cells import scored
    from stages.common.config import Paths, load_section, read_yaml
    from stages.common.held_out import held_out
    from stages.common.lm import greedy, load_causal_lm, load_tokenizer, resolve_dtype
    from stages.common.scores import SCORERS
    from stages.evaluate import EvaluateConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("folders", nargs="+", type=Path, help="policy folders; the first is the baseline")
    args = ap.parse_args(argv)
    params = read_yaml(args.params)
    cfg = load_section(EvaluateConfig, "evaluate", params)
    if cfg.preferences is None:
        raise SystemExit("evaluate.preferences is null: no prompts and no judge")
    paths = load_section(Paths, "paths", params)
    held = held_out(paths, cfg.perplexity_blocks, cfg.instruction_items, cfg.preferences, cfg.batch_size)
    if not held.scorers:
        raise SystemExit(f"neither the judge nor the proxy: {held.skipped}")
    prompts = [m for _, m in held.prompts]
    scores: dict[str, dict[Path, dict[str, float]]] = {row: {} for row in held.scorers}
    dtype = resolve_dtype(cfg.dtype)  # as evaluate loads an unquantized row
    for folder in args.folders:
        answers = greedy(load_causal_lm(folder, dtype=dtype), load_tokenizer(folder), prompts,
                         cfg.preferences.answer_tokens, batch_size=cfg.batch_size)
        for row, scorer in held.scorers.items():
            scores[row][folder] = {pid: s for (pid, _), s in zip(held.prompts, scored(scorer, prompts, answers))}
    base = args.folders[0]
    for row, found in scores.items():
        print(f"{row} ({SCORERS[row][1]}), {len(prompts)} test prompts: "
              f"mean {stats.mean_stderr(list(found[base].values()))[0]:.3f} for {base}")
        for folder in args.folders[1:]:
            w = stats.win_rate(found[base], found[folder], iters=cfg.bootstrap_iters, seed=cfg.seed,
                               level=cfg.confidence)
            mean = stats.mean_stderr(list(found[folder].values()))[0]
            print(f"  {folder}: mean {mean:.3f}, win rate against {base} {w['value']:.3f} "
                  f"[{w['low']:.3f}, {w['high']:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
