"""Win rates of policy folders on evaluate's held-out prompts, judged by the pipeline's reward model.

evaluate compares each row with the one before it; this compares any folders, in the order given
(each against the first), with the same prompts, answers and judge as evaluate's `reward_score`:
the ppo variants of a tuning run against sft without running the whole stage.

    python -m bench.winrate_bench [--params params.yaml] models/sft models/ppo other/ppo
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from stages.common import benchmarks, stats
    from stages.common.config import Paths, load_section, read_yaml
    from stages.common.lm import greedy, load_causal_lm, load_tokenizer
    from stages.evaluate import EvaluateConfig, held_out
    from stages.sft import SftConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("folders", nargs="+", type=Path, help="policy folders; the first is the baseline")
    args = ap.parse_args(argv)
    params = read_yaml(args.params)
    cfg = load_section(EvaluateConfig, "evaluate", params)
    if cfg.preferences is None:
        raise SystemExit("evaluate.preferences is null: no prompts and no judge")
    paths = load_section(Paths, "paths", params)
    task = cfg.preferences.task
    built, skipped = benchmarks.load_tasks(benchmarks.task_manager(cfg.task_dir, [task]), [task], cfg.task_dir)
    held = held_out(cfg, paths, load_section(SftConfig, "sft", params), built)
    if held.scorer is None:
        raise SystemExit(f"no judge: {held.skipped or skipped}")
    prompts = [m for _, m in held.prompts]
    scores = {}
    for folder in args.folders:
        answers = greedy(load_causal_lm(folder, dtype=cfg.dtype), load_tokenizer(folder), prompts,
                         cfg.preferences.answer_tokens, batch_size=cfg.batch_size)
        scores[folder] = {pid: s for (pid, _), s in zip(held.prompts, held.scorer(prompts, answers))}
    base = args.folders[0]
    print(f"{len(prompts)} prompts of {task}; mean reward {stats.mean_stderr(list(scores[base].values()))[0]:.3f} "
          f"for {base}")
    for folder in args.folders[1:]:
        w = stats.win_rate(scores[base], scores[folder], iters=cfg.bootstrap_iters, seed=cfg.seed,
                           level=cfg.confidence)
        mean = stats.mean_stderr(list(scores[folder].values()))[0]
        print(f"{folder}: mean reward {mean:.3f}, win rate against {base} {w['value']:.3f} "
              f"[{w['low']:.3f}, {w['high']:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
