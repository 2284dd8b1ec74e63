"""Nothing lost, nothing leaked: the collect readers fed broken files, binary data, symlinks
leaving their folder, hostile archives and oversized files. Each test fails when its promise breaks."""

from __future__ import annotations

import io
import json
import stat
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from stages.collect import READERS, CorpusSource, InstructionSource, run
from stages.common.config import Paths
from stages.common.io import Drop, read_records
from tests.conftest import tiny_config

ENGLISH = ["Café au lait at the crème brûlée stand, naïve façade.", "Plain ASCII English, nothing special here.",
           "Zoë and Björn saw the Ångström exhibit in São Paulo."]
CHINESE = ["北京是中华人民共和国的首都，也是全国的政治和文化中心。",
           "今天天气很好，我们去公园散步，看见很多人在锻炼身体。"]
SECRET = "SECRET-outside-the-source"

SOURCE_FIELDS = {
    "jsonl": {"text_field": "text", "id_field": "id"}, "parquet": {"text_field": "text", "id_field": None},
    "text": {"glob": "**/*", "split": "file"}, "tagged": {"lines_per_doc": 1}, "mediawiki": {"namespaces": [0]},
    "archive": {"glob": "**/*.txt", "format": "text"}, "bigbench": {"prompt_template": "{input}", "holdout": False},
}


def source(type: str, path: Path, **fields: object) -> dict:
    return {"name": type, "type": type, "path": str(path), "max_docs": None, **SOURCE_FIELDS[type], **fields}


def collect(paths: Paths, sources: list[dict], **changes: object) -> tuple[dict, dict[str, str]]:
    """collect's metrics (checked: docs_in == docs_out + dropped) and the corpus as id -> text."""
    cfg = tiny_config("collect", sources=sources, instructions=[], preferences=[], limit=None, **changes)
    metrics = run(cfg, paths, evaluate=tiny_config("evaluate"))
    assert metrics["docs_in"] == metrics["docs_out"] + sum(metrics["dropped"].values())
    return metrics, {d["id"]: d["text"] for d in read_records(paths.raw, "corpus")}


def read(type: str, path: Path, **fields: object) -> list:
    """What one reader yields for one source, called directly (a source may yield no record)."""
    adapter = TypeAdapter(InstructionSource if type == "bigbench" else CorpusSource)
    src = adapter.validate_python(source(type, path, **fields))
    return list(READERS["instructions" if type == "bigbench" else "corpus"][type](src, "test", Counter()))


def dropped_details(paths: Paths) -> list[dict]:
    return [json.loads(x) for x in (paths.reports / "collect/samples_dropped.jsonl").read_text().splitlines()]


def test_a_record_with_invalid_utf8_never_changes_how_its_neighbours_are_read(paths: Paths, tmp_path: Path) -> None:
    valid = [{"id": f"en{i}", "text": t} for i, t in enumerate(ENGLISH)] + \
            [{"id": f"zh{i}", "text": t} for i, t in enumerate(CHINESE)]
    lines = [json.dumps(r, ensure_ascii=False).encode("utf-8") for r in valid]
    broken = b'{"id": "bad", "text": "broken \xff\xfe\x80\x81 bytes \xc3"}'
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\n".join(lines[:3] + [broken] + lines[3:]) + b"\n")
    # the same documents one a line, read by the text source
    plain = tmp_path / "mixed.txt"
    plain.write_bytes(b"\n".join([t.encode() for t in ENGLISH] + [b"broken \xff\xfe\x80 line"]
                                 + [t.encode() for t in CHINESE]) + b"\n")
    m, docs = collect(paths, [source("jsonl", mixed), source("text", plain, split="line")])
    for r in valid:  # every valid record byte-identical, whatever its neighbour holds
        assert docs[r["id"]].encode("utf-8") == r["text"].encode("utf-8")
    text_docs = [docs[f"mixed.txt:{n}"] for n in (1, 2, 3, 5, 6)]
    assert text_docs == ENGLISH + CHINESE
    # the broken lines are quarantined on their own, named and counted
    assert m["dropped"] == {"invalid_utf8": 2}
    assert {d["detail"] for d in dropped_details(paths)} == {f"{mixed}:4", f"{plain}:4"}
    assert m["docs_out"] == len(valid) + len(ENGLISH) + len(CHINESE)


def test_binary_data_is_told_by_content_even_when_it_decodes_as_utf8(paths: Paths, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "nul.txt").write_bytes(b"\x00" * 3000 + b"a few words of text")
    assert (src / "nul.txt").read_bytes().decode("utf-8")  # it is valid UTF-8
    (src / "prose.txt").write_text(ENGLISH[0], encoding="utf-8")
    m, docs = collect(paths, [source("text", src)])
    assert docs == {"prose.txt": ENGLISH[0]}
    assert m["dropped"] == {"binary_file": 1}
    (tmp_path / "nul.jsonl").write_bytes(b"\x00\x01\x02" * 1000 + b'\n{"id": "x", "text": "hidden"}\n')
    assert read("jsonl", tmp_path / "nul.jsonl") == [Drop("binary_file", str(tmp_path / "nul.jsonl"))]


def _plant(type: str, outside: Path) -> Path:
    """A file of `type` holding SECRET in `outside`; the path of the file or folder it belongs to."""
    outside.mkdir()
    if type in ("text", "tagged"):
        (outside / "secret.txt").write_text(SECRET)
    elif type == "jsonl":
        (outside / "secret.jsonl").write_text(json.dumps({"id": "s", "text": SECRET}) + "\n")
    elif type == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [SECRET]}), outside / "secret.parquet")
    elif type == "mediawiki":
        (outside / "secret.xml").write_text(f"<mediawiki><page><title>T</title><ns>0</ns><id>1</id>"
                                            f"<revision><text>{SECRET}</text></revision></page></mediawiki>")
    elif type == "bigbench":
        (outside / "task.json").write_text(json.dumps({"examples": [{"input": SECRET, "target": "x"}]}))
    elif type == "archive":
        with zipfile.ZipFile(outside / "secret.zip", "w") as zf:
            zf.writestr("secret.txt", SECRET)
    return next(outside.iterdir())


@pytest.mark.parametrize("type", ["jsonl", "parquet", "text", "tagged", "mediawiki", "bigbench", "archive"])
@pytest.mark.parametrize("layout", ["file", "folder"])
def test_no_reader_follows_a_symlink_out_of_its_source(tmp_path: Path, type: str, layout: str) -> None:
    secret = _plant(type, tmp_path / "outside")
    folder = tmp_path / "src"
    (folder / "task").mkdir(parents=True)
    link = (folder / "task" / secret.name) if type == "bigbench" else folder / secret.name
    link.symlink_to(secret)
    if layout == "folder" and type not in ("parquet", "text", "bigbench"):
        pytest.skip(f"{type} reads one file")
    items = read(type, folder if layout == "folder" else link)
    assert SECRET not in json.dumps([i for i in items if not isinstance(i, Drop)])
    assert [i.reason for i in items] == ["symlink_outside_source"]


def _hostile_archive(path: Path) -> None:
    """An archive with two good members and hostile ones: zip slip, an absolute path, a symlink
    (and, in a tar, a hard link)."""
    good = {"docs/a.txt": ENGLISH[0], "b.txt": CHINESE[0]}
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as zf:
            for name, text in good.items():
                zf.writestr(name, text)
            zf.writestr("../../evil.txt", SECRET)
            zf.writestr("/abs.txt", SECRET)
            link = zipfile.ZipInfo("link.txt")
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(link, "/etc/passwd")
        return
    with tarfile.open(path, "w:" + path.name.rsplit(".", 1)[-1] if ".tar." in path.name else "w") as tf:
        for name, text in [*good.items(), ("../../evil.txt", SECRET), ("/abs.txt", SECRET)]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        links = [("link.txt", tarfile.SYMTYPE, "/etc/passwd"), ("hard.txt", tarfile.LNKTYPE, "b.txt")]
        for name, kind, target in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)


@pytest.mark.parametrize("name", ["a.zip", "a.tar", "a.tar.gz", "a.tar.bz2", "a.tar.xz"])
def test_archive_members_that_escape_its_root_are_refused_and_counted(paths: Paths, tmp_path: Path,
                                                                      name: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    _hostile_archive(work / name)
    m, docs = collect(paths, [source("archive", work / name)])
    assert docs == {"docs/a.txt": ENGLISH[0], "b.txt": CHINESE[0]}
    assert m["dropped"] == {"unsafe_archive_member": 4 if "tar" in name else 3}
    assert SECRET not in "".join(docs.values())
    assert list(work.rglob("*")) == [work / name]  # nothing extracted beside the archive
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("abs.txt"))


def test_a_file_over_the_size_cap_is_dropped_and_named(paths: Paths, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_text(ENGLISH[0])
    (src / "big.txt").write_text("word " * 400)
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in (("ok", ENGLISH[1]), ("huge", "x" * 5000),
                                                                            ("ok2", ENGLISH[2]))))
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("small.txt", ENGLISH[2])
        zf.writestr("big.txt", "word " * 400)
    m, docs = collect(paths, [source("text", src), source("jsonl", lines), source("archive", tmp_path / "a.zip")],
                      max_file_bytes=1000)
    assert sorted(docs.values()) == sorted([ENGLISH[0], ENGLISH[1], ENGLISH[2], ENGLISH[2]])
    assert m["dropped"] == {"file_too_large": 2, "record_too_large": 1}
    details = [d["detail"] for d in dropped_details(paths)]
    assert any(f"{src / 'big.txt'}" in d for d in details)
    assert any(f"{lines}:2" in d for d in details)
    assert any("a.zip!big.txt" in d for d in details)


# --- `hf` sources: a `save_to_disk` folder is a folder of files, a hub name is streamed ----------

HF_FIELDS = {"split": "train", "text_field": "text", "id_field": "id"}


def saved_dataset(folder: Path, rows: list[dict], shards: int) -> list[Path]:
    """A DatasetDict with a `train` split saved to `folder` in `shards` data files; returns them."""
    import datasets

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    splits.save_to_disk(str(folder), num_shards={"train": shards})
    return sorted((folder / "train").glob("*.arrow"))


def test_an_hf_folder_is_read_like_files_symlink_rule_and_size_cap(paths: Paths, tmp_path: Path) -> None:
    import shutil

    rows = [{"id": f"en{i}", "text": t} for i, t in enumerate(ENGLISH)] + [{"id": "huge", "text": "word " * 400}]
    src = tmp_path / "ds"
    saved_dataset(src, rows[:2], 1)
    (second,) = saved_dataset(tmp_path / "elsewhere", rows[2:], 1)
    # the second data file of the source is a link to one outside it that holds a secret
    outside = saved_dataset(tmp_path / "outside", [{"id": "s", "text": SECRET}], 1)[0]
    state = json.loads((src / "train/state.json").read_text())
    state["_data_files"].append({"filename": "linked.arrow"})
    (src / "train/state.json").write_text(json.dumps(state))
    (src / "train/linked.arrow").symlink_to(outside)
    # and a third one is a real file in it, with a row over the cap
    shutil.copy2(second, src / "train/third.arrow")
    state["_data_files"].append({"filename": "third.arrow"})
    (src / "train/state.json").write_text(json.dumps(state))

    m, docs = collect(paths, [{"name": "hf", "type": "hf", "path": str(src), "max_docs": None, **HF_FIELDS}],
                      max_file_bytes=1000)
    assert docs == {"en0": ENGLISH[0], "en1": ENGLISH[1], "en2": ENGLISH[2]}
    assert m["dropped"] == {"symlink_outside_source": 1, "record_too_large": 1}
    assert SECRET not in json.dumps(dropped_details(paths)) + "".join(docs.values())
    details = {d["reason"]: d["detail"] for d in dropped_details(paths)}
    assert details["symlink_outside_source"].startswith(str(src / "train/linked.arrow"))
    assert details["record_too_large"] == f"{src}#3: over 1000 bytes"


def test_an_hf_dataset_that_cannot_be_read_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants

    from stages.common.config import StageError

    def refusal(path: str, **fields: object) -> str:
        src = TypeAdapter(CorpusSource).validate_python(
            {"name": "mine", "type": "hf", "path": path, "max_docs": None, **HF_FIELDS, **fields})
        with pytest.raises(StageError) as err:
            list(READERS["corpus"]["hf"](src, "collect.sources[0] (mine)", Counter()))
        message = str(err.value)
        assert message.count("\n") == 0 and message.startswith(
            f"collect.sources[0] (mine): cannot read the dataset '{path}' (split {fields.get('split', 'train')}): ")
        return message

    saved_dataset(tmp_path / "ds", [{"id": "a", "text": ENGLISH[0]}], 1)
    assert refusal(str(tmp_path / "ds"), split="test").endswith("it has no split 'test' (splits: train)")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain/notes.txt").write_text(ENGLISH[0])
    assert "holds no state.json: not a `save_to_disk` folder" in refusal(str(tmp_path / "plain"))
    # a hub name this machine cannot reach (offline mode: the library answers at once, no retries)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "Couldn't reach 'someone/missing-dataset'" in refusal("someone/missing-dataset")
