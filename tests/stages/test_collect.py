"""collect: every source type on real or planted input; bad input is counted, never lost."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from stages.collect import READERS, CollectConfig, run
from stages.common.config import Paths, StageError, read_yaml
from stages.common.io import read_records
from tests.conftest import ROOT, tiny_config

# Every key a source type needs besides name, type and path (the configs have no defaults).
FIELDS = {
    "jsonl": {"text_field": "text", "id_field": "id"}, "parquet": {"text_field": "text", "id_field": "id"},
    "text": {}, "tagged": {"lines_per_doc": 1},
    "mediawiki": {"namespaces": [0]}, "hf": {"split": "train", "text_field": "text", "id_field": "id"},
    "url": {"max_bytes": 1_000_000, "timeout_s": 10.0}, "alpaca": {}, "chat": {"messages_field": "messages"},
    "pairs": {}, "bigbench": {"prompt_template": "{input}", "holdout": False},
    "archive": {"glob": "**/*.txt", "format": "text"},
}


def source(name: str, type: str, path: str, **fields: object) -> dict:
    return {"name": name, "type": type, "path": path, "max_docs": None, **FIELDS[type], **fields}


def collect(paths: Paths, **sections) -> dict:
    """The tiny profile's collect section with `sections` in its place (no instructions or
    preferences and no limit unless given)."""
    metrics = run(tiny_config("collect", **{"instructions": [], "preferences": [], "limit": None, **sections}), paths,
                  evaluate=tiny_config("evaluate"))
    assert metrics["docs_in"] == metrics["docs_out"] + sum(metrics["dropped"].values())
    return metrics


def test_every_source_type_has_a_reader() -> None:
    every = set()
    for kind, field in (("corpus", "sources"), ("instructions", "instructions"), ("preferences", "preferences")):
        union = CollectConfig.model_fields[field].annotation.__args__[0].__origin__
        types = {t.model_fields["type"].annotation.__args__[0] for t in union.__args__}
        assert types == set(READERS[kind]), kind
        every |= types
    assert every == set(FIELDS)


def test_real_sources_keep_their_ids(paths: Paths) -> None:
    cfg = tiny_config("collect", limit=30, instructions=[], preferences=[])
    m = run(cfg, paths, evaluate=tiny_config("evaluate"))
    docs = read_records(paths.raw, "corpus")
    by_source = {s.name: [d for d in docs if d["source"] == s.name] for s in cfg.sources}
    assert {name: len(d) for name, d in by_source.items()} == {"wikipedia": 30 - m["dropped"]["redirect"],
                                                               "abc_news": 30, "peoples_daily": 30}
    # Wikipedia pages keep their page id; redirects are counted, not kept
    assert all(d["id"].isdigit() for d in by_source["wikipedia"])
    pd = by_source["peoples_daily"][0]
    assert "/n" not in pd["text"] and "迈向充满希望的新世纪" in pd["text"] and pd["text"].count("\n") == 3
    assert len({d["id"] for d in docs}) == len(docs)


def test_bad_jsonl_lines_are_counted(paths: Paths, tmp_path: Path) -> None:
    f = tmp_path / "docs.jsonl"
    lines = [
        json.dumps({"id": "a", "text": "fine"}),
        "{not json",
        json.dumps({"id": "b", "text": 42}),
        json.dumps({"id": "c"}),
        json.dumps(["a list"]),
        json.dumps({"id": "d", "text": "nul \x00 inside"}),
        '{"id": "e", "text": "lone \\ud800 surrogate"}',
        json.dumps({"id": "a", "text": "same id, other text"}),
        json.dumps({"id": "big", "text": "x" * 5_000_000}),
        "",
    ]
    f.write_text("\n".join(lines), encoding="utf-8")
    m = collect(paths, sources=[source("j", "jsonl", str(f))])
    assert m["dropped"] == {"malformed_json": 1, "wrong_type_text": 1, "missing_text": 1, "not_an_object": 1}
    docs = {d["id"]: d["text"] for d in read_records(paths.raw, "corpus")}
    assert docs["d"] == "nul \x00 inside"  # kept as is: clean strips control characters
    assert docs["e"] == "lone \ufffd surrogate"
    assert m["repairs"]["lone_surrogates_replaced"] == 1
    assert len(docs["big"]) == 5_000_000  # collect keeps it; clean drops it as too long
    # two records with one id: both kept, the second made unique
    assert docs["a"] == "fine" and any(k.startswith("a~") for k in docs)
    assert m["repairs"]["ids_made_unique"] == 1
    dropped = [json.loads(x) for x in (paths.reports / "collect/samples_dropped.jsonl").read_text().splitlines()]
    assert dropped[0] == {"kind": "corpus", "source": "j", "reason": "malformed_json", "detail": f"{f}:2"}


def test_text_folder_files_encodings_binary_empty_symlinks(paths: Paths, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "utf8.txt").write_text("Grüße aus Köln, das ist ein Text.", encoding="utf-8")
    (src / "latin1.txt").write_bytes("Ça va très bien, merci beaucoup à vous tous ici.".encode("latin-1"))
    (src / "gbk.txt").write_bytes("中华人民共和国成立于一九四九年，首都是北京。这是一个中文文件。".encode("gbk"))
    (src / "empty.txt").write_bytes(b"")
    (src / "binary.txt").write_bytes(bytes(range(256)) * 40)
    outside = tmp_path / "secret.txt"
    outside.write_text("must not be read")
    (src / "escape.txt").symlink_to(outside)
    m = collect(paths, sources=[source("t", "text", str(src))])
    docs = {d["id"]: d["text"] for d in read_records(paths.raw, "corpus")}
    assert docs["utf8.txt"].startswith("Grüße")
    assert docs["latin1.txt"].startswith("Ça va très bien")
    assert docs["gbk.txt"].startswith("中华人民共和国")
    assert m["dropped"] == {"empty_file": 1, "binary_file": 1, "symlink_outside_source": 1}
    assert "must not be read" not in docs.values()


def test_missing_path_and_unreadable_source_fail_with_one_sentence(paths: Paths, tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"collect\.sources\[0\] \(gone\): path .*nope\.jsonl does not exist"):
        collect(paths, sources=[source("gone", "jsonl", str(tmp_path / "nope.jsonl"))])
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{broken\n[1,\n")
    with pytest.raises(StageError, match=r"collect\.sources\[0\] \(junk\): no readable record"):
        collect(paths, sources=[source("junk", "jsonl", str(junk))])
    assert not paths.raw.exists()  # nothing half-written


def test_instruction_and_preference_formats(paths: Paths, tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "a document"}) + "\n")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "No answer here.", "input": ""},
    ]))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join([
        json.dumps({"id": "c1", "messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}),
        json.dumps({"id": "c2", "messages": "not a list"}),
    ]))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join([
        json.dumps({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}),
        json.dumps({"prompt": [{"role": "user", "content": "2+2?"}],
                    "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                    "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}),
        json.dumps({"prompt": "x", "chosen": 1, "rejected": "y"}),
    ]))
    m = collect(paths, sources=[source("c", "jsonl", str(corpus))],
                instructions=[source("alpaca", "alpaca", str(alpaca)), source("chat", "chat", str(chat))],
                preferences=[source("pairs", "pairs", str(pairs))])
    inst = read_records(paths.raw, "instructions")
    assert inst[0]["messages"] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                                   {"role": "assistant", "content": "5"}]
    assert [r["id"] for r in inst if r["source"] == "chat"] == ["c1"]
    prefs = read_records(paths.raw, "preferences")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in prefs] == [("Capital of France?", "Paris.", "Lyon."),
                                                                          ("2+2?", "4", "5")]
    assert m["kinds"]["instructions"]["dropped"] == {"missing_output": 1, "malformed_messages": 1}
    assert m["kinds"]["preferences"]["dropped"] == {"malformed_pair": 1}


def test_bigbench_tasks_become_instructions_and_pairs(paths: Paths) -> None:
    root = Path(__file__).resolve().parents[2] / "assets/bigbench"
    if not root.exists():
        pytest.skip("assets not extracted (make setup)")
    collect(paths, limit=10,
            sources=[source("abc", "text", "pkg://gensim/test/test_data/lee_background.cor", split="line")],
            instructions=[source("xsum", "bigbench", str(root / "gem/xsum/task.json"),
                                 prompt_template="Summarize:\n\n{input}")],
            preferences=[source("hhh", "bigbench", str(root / "hhh_alignment"))])
    inst = read_records(paths.raw, "instructions")
    assert len(inst) == 10 and inst[0]["messages"][0]["content"].startswith("Summarize:\n\n")
    prefs = read_records(paths.raw, "preferences")
    assert prefs and all(p["chosen"] != p["rejected"] for p in prefs)


def test_a_benchmark_source_gives_only_the_part_the_evaluation_set_does_not_score(paths: Paths) -> None:
    """hhh_alignment is SFT data, reward pairs and a benchmark: collect keeps the items the shared salted
    hash leaves for training, and those are exactly the evaluation set's items evaluate does not score."""
    root = Path(__file__).resolve().parents[2] / "assets"
    if not root.exists():
        pytest.skip("assets not extracted (make setup)")
    hhh = str(root / "bigbench/hhh_alignment")
    m = collect(paths, sources=[source("abc", "text", "pkg://gensim/test/test_data/lee_background.cor", split="line")],
                instructions=[source("hhh", "bigbench", hhh, holdout=True)],
                preferences=[source("hhh", "bigbench", hhh, holdout=True)])
    holdout = tiny_config("evaluate").holdout
    lines = (root / "lm_eval/hhh_alignment.jsonl").read_text().splitlines()
    evaluation_set = [json.loads(line) for line in lines]
    scored = {r["id"] for r in evaluation_set if holdout.for_evaluation(r)}
    trained = {r["id"] for r in read_records(paths.raw, "instructions")}
    # the items whose question the preference data holds out as its test part train no model either
    tested = {r["id"].rpartition("/")[0] for r in read_records(paths.raw, "preferences") if r["split"] == "test"}
    assert trained and scored and tested and not trained & scored and not trained & tested
    assert trained | scored | tested == {r["id"] for r in evaluation_set}
    assert m["kinds"]["instructions"]["dropped"] == {"test_prompt": len(tested)}
    # a question asked by several items (with other answers) is on one side only
    prompts = {r["id"]: r["input"] for r in evaluation_set}
    assert not {prompts[i] for i in trained} & {prompts[i] for i in scored}
    assert not {r["id"].rpartition("/")[0] for r in read_records(paths.raw, "preferences")} & scored
    assert m["kinds"]["instructions"]["held_out_for_evaluation"] == {"hhh": len(scored)}
    assert m["kinds"]["preferences"]["held_out_for_evaluation"] == {"hhh": len(scored)}


def test_hf_dataset_folder_stands_in_for_the_hub(paths: Paths, tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"id": ["x", "y"], "content": ["first text", None]}).save_to_disk(str(tmp_path / "ds"))
    m = collect(paths, sources=[source("hf", "hf", str(tmp_path / "ds"), text_field="content")])
    assert [d["id"] for d in read_records(paths.raw, "corpus")] == ["x"]
    assert m["dropped"] == {"missing_content": 1}


def test_url_source_is_size_capped(paths: Paths) -> None:
    body = b"A page served over http on the loopback interface."

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/page.txt"
    try:
        collect(paths, sources=[source("web", "url", url)])
        assert read_records(paths.raw, "corpus")[0]["text"] == body.decode()
        with pytest.raises(StageError, match="no readable record"):
            collect(paths, sources=[source("web", "url", url, max_bytes=10)])
    finally:
        server.shutdown()


def test_legacy_encoded_line_files_are_decoded_line_by_line(paths: Paths, tmp_path: Path) -> None:
    zh = ["中华人民共和国成立于一九四九年，首都是北京。", "这是一个中文文件，每一行是一篇文章。", "ASCII line"]
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("\n".join(zh).encode("gbk"))
    fr = ["Ça va très bien, merci beaucoup à vous tous ici.", "Où est la bibliothèque, s'il vous plaît ?"]
    cp = tmp_path / "cp1252.jsonl"
    cp.write_bytes("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in fr).encode("cp1252"))
    m = collect(paths, sources=[source("zh", "text", str(gbk), split="line"),
                                source("fr", "jsonl", str(cp), id_field=None)])
    texts = [d["text"] for d in read_records(paths.raw, "corpus")]
    assert texts == zh + fr and m["dropped"] == {}
    assert m["repairs"]["lines_decoded_gb18030"] == 2


def test_archive_members_are_read_like_files_of_a_folder(paths: Paths, tmp_path: Path) -> None:
    import tarfile
    import zipfile

    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as zf:
        zf.writestr("data/a.jsonl", json.dumps({"id": "a", "text": "first"}) + "\n{broken\n")
        zf.writestr("data/b.jsonl", json.dumps({"id": "b", "text": "second"}))
        zf.writestr("notes.txt", "not matched by the glob")
    lines = tmp_path / "lines.txt"
    lines.write_text("one line\n\ntwo line\n")
    with tarfile.open(tmp_path / "text.tar.gz", "w:gz") as tf:
        tf.add(lines, "./corpus/lines.txt")
    m = collect(paths, sources=[
        source("z", "archive", str(tmp_path / "docs.zip"), glob="data/*.jsonl", format="jsonl", id_field="id"),
        source("t", "archive", str(tmp_path / "text.tar.gz"), glob="**/*.txt", format="text", split="line")])
    docs = {d["id"]: d["text"] for d in read_records(paths.raw, "corpus")}
    assert docs == {"a": "first", "b": "second", "corpus/lines.txt:1": "one line", "corpus/lines.txt:3": "two line"}
    assert m["dropped"] == {"malformed_json": 1}
    with pytest.raises(StageError, match="not a zip or tar archive"):
        collect(paths, sources=[source("x", "archive", str(lines), glob="*")])


def test_every_pair_of_a_prompt_lands_in_one_part_and_no_instruction_asks_a_test_prompt(
        paths: Paths, tmp_path: Path) -> None:
    """The split is by prompt (case and spacing do not make another prompt), the shares are near
    the configured ones, and an instruction asking a test prompt is dropped with its reason."""
    from stages.common.preferences import PARTS, normalize_prompt

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "a document"}) + "\n")
    pairs, chats = tmp_path / "pairs.jsonl", tmp_path / "chat.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} squared?", "chosen": str(i * i), "rejected": str(i + 1)}
            for i in range(400)]
    rows += [{**r, "prompt": "  " + r["prompt"].upper(), "rejected": "no idea"} for r in rows[:100]]
    pairs.write_text("\n".join(json.dumps(r) for r in rows))
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                        {"role": "assistant", "content": r["chosen"]}]})
                               for r in rows[:400]))
    m = collect(paths, sources=[source("c", "jsonl", str(corpus))], preferences=[source("p", "pairs", str(pairs))],
                instructions=[source("chat", "chat", str(chats))])
    prefs = read_records(paths.raw, "preferences")
    parts: dict[str, set[str]] = {}
    for r in prefs:
        parts.setdefault(normalize_prompt(r["prompt"]), set()).add(r["split"])
    assert len(parts) == 400 and all(len(found) == 1 for found in parts.values())
    split = tiny_config("collect").preference_split
    counts = m["kinds"]["preferences"]["splits"]
    assert set(counts) == set(PARTS) and sum(counts.values()) == len(prefs) == 500
    for part in PARTS:  # 400 prompts: each share within 0.06 of the configured one
        share = sum(1 for found in parts.values() if part in found) / 400
        assert abs(share - getattr(split, part)) < 0.06, (part, share)
    test = {p for p, found in parts.items() if "test" in found}
    kept = read_records(paths.raw, "instructions")
    assert len(kept) == 400 - len(test) and not {normalize_prompt(r["messages"][0]["content"]) for r in kept} & test
    assert m["kinds"]["instructions"]["dropped"] == {"test_prompt": len(test)}
    # a new salt draws other parts
    other = split.model_copy(update={"salt": "another"})
    assert sum(other.part(p) != split.part(p) for p in parts) > 100


def test_the_shares_of_the_parts_must_add_up_to_one() -> None:
    from stages.common.config import ConfigError

    with pytest.raises(ConfigError, match=r"collect\.preference_split: .*add up to 1\.1, not 1"):
        tiny_config("collect", preference_split={"reward": 0.4})


def test_the_split_survives_every_data_stage(tiny_inputs: Paths) -> None:
    """clean, decontam and dedup pass each preference record's part on as collect decided it."""
    raw = {r["id"]: r["split"] for r in read_records(tiny_inputs.raw, "preferences")}
    assert set(raw.values()) == {"reward", "judge", "policy", "test"}
    for stage in ("clean", "decontam", "dedup"):
        found = read_records(getattr(tiny_inputs, stage), "preferences")
        assert found and all(r["split"] == raw[r["id"]] for r in found), stage


def test_no_training_source_reads_a_task_the_evaluation_scores() -> None:
    """Every BIG-bench source of the demo's instructions and preferences is a task `make setup`
    extracts, and none is one of the evaluation's tasks, but for hhh_alignment's salted training part."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_assets", ROOT / "scripts/fetch_assets.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    params = read_yaml(ROOT / "params.yaml")["collect"]
    sources = [s for kind in ("instructions", "preferences") for s in params[kind] if s["type"] == "bigbench"]
    assert len([s for s in params["preferences"] if s["type"] == "bigbench"]) >= 10
    for src in sources:
        task = str(Path(src["path"]).relative_to("assets/bigbench"))
        assert any(task == t or task.startswith(t + "/") for t in fetch.TASKS), src["name"]
        evaluated = [t for t in fetch.EVALUATION_TASKS if task == t or task.startswith(t + "/")]
        assert not evaluated or src["holdout"], f"{src['name']} trains on {evaluated}, which evaluate scores"
