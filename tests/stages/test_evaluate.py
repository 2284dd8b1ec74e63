"""evaluate: the lm-eval task files over the real sets, and the stage on tiny models: a model built
to pick the gold answer scores 1, one built to pick the other 0, in one table; and a recorded skip
(never a lost table) for each kind of bad input. (The HumanEval sandbox:
tests/reliability/test_sandbox.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import stages
from stages.common.config import ConfigError, Paths, load_section, read_yaml
from stages.common.io import write_jsonl
from stages.common.tables import markdown
from stages.evaluate import EvaluateConfig, run, score
from tests.conftest import tiny_config, tiny_model, tiny_params

ROOT = Path(stages.__file__).resolve().parent.parent
TASK_DIR = ROOT / "configs/lm_eval"
TASKS = {"hhh_alignment": {"limit": 2, "max_new_tokens": None, "holdout": True},
         "bigbench_arithmetic": {"limit": 2, "max_new_tokens": 4, "holdout": False}}


def config(**changes: object) -> EvaluateConfig:
    """The tiny profile's evaluate section with whole keys replaced (a task dict is replaced, not
    merged, so a test names exactly the columns it wants)."""
    section = {**tiny_params()["evaluate"], **changes}
    return load_section(EvaluateConfig, "evaluate", {"evaluate": section})


def evaluate(cfg: EvaluateConfig, paths: Paths, held_out: bool = True) -> dict:
    """evaluate's run; `held_out`: first write the instructions sft holds out, as sft writes them."""
    if held_out:
        from stages.common.io import read_records
        from stages.common.lm import load_tokenizer
        from stages.sft import prepare

        tokenizer = load_tokenizer(paths.base, fallback=paths.tokenized / "tokenizer")
        write_jsonl(paths.sft_held_out(), prepare(read_records(paths.dedup, "instructions"), tokenizer,
                                                  tiny_config("sft"))[1])
    return run(cfg, paths)


def limits(limit: int | None, max_new_tokens: int | None = None, holdout: bool = False) -> dict:
    return {"limit": limit, "max_new_tokens": max_new_tokens, "holdout": holdout}


# ---------------------------------------------------------------------------------------------
# the task files


def test_every_task_file_loads_its_local_data(monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)
    manager = TaskManager(include_path=str(TASK_DIR))
    params = load_section(EvaluateConfig, "evaluate", read_yaml(ROOT / "params.yaml"))
    for name in params.tasks:
        task = manager.load([name])["tasks"][name]
        docs = list(task.eval_docs)
        assert len(docs) > 100, name
        # the gold answer is one of the choices / a non-empty target on every record
        if task.OUTPUT_TYPE == "multiple_choice":
            assert all(0 <= task.doc_to_target(d) < len(task.doc_to_choice(d)) for d in docs), name
        else:
            assert all(str(task.doc_to_target(d)).strip() for d in docs), name


def test_score_reads_the_declared_metric_not_its_stderr_or_sample_count() -> None:
    out = {"results": {"t": {"alias": "t", "sample_len": 4, "acc_stderr,none": 0.2, "acc,none": 0.75}},
           "higher_is_better": {"t": {"acc": True}}}
    assert score(out, "t") == ("acc", 0.75)
    assert score({"results": {}}, "t") is None


def test_markdown_shows_errors_and_marks_skipped_cells() -> None:
    text = markdown({"base": {"perplexity": 12.345, "hhh_alignment": 0.5}},
                    {"base": {"perplexity": 0.51, "hhh_alignment": 0.125}}, ["perplexity", "hhh_alignment", "x"],
                    {"perplexity": "token perplexity", "hhh_alignment": "acc"}, {"x": "no task named 'x'"})
    assert "| base | 12.35 ± 0.51 | 0.500 ± 0.125 | skipped |" in text and "- `x`: no task named 'x'" in text


def test_contamination_finds_an_evaluation_item_in_the_training_data(tiny_workdir: Paths,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval.tasks import TaskManager

    from stages.common.benchmarks import item_text
    from stages.common.io import read_records, write_records
    from stages.evaluate import contamination, training_ngrams

    monkeypatch.chdir(ROOT)
    task = TaskManager(include_path=str(TASK_DIR)).load(["hhh_alignment"])
    cfg = config(task_dir=TASK_DIR, tasks={"hhh_alignment": limits(3)})
    clean = contamination({"hhh_alignment": task["tasks"]}, cfg, set())
    assert clean == {"hhh_alignment": {"checked": 3, "seen": 0}}
    # the second item's preferred answer, reworded only in case and punctuation, as SFT data
    doc = list(task["tasks"]["hhh_alignment"].eval_docs)[1]
    answer = doc["choices"][doc["gold"]].upper().replace(",", " ;")
    records = read_records(tiny_workdir.dedup, "instructions")
    records.append({"id": "leak", "source": "test", "messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": answer}]})
    write_records(tiny_workdir.dedup, "instructions", records)
    assert len(answer.split()) >= 13, item_text(task["tasks"]["hhh_alignment"], doc)
    seen = contamination({"hhh_alignment": task["tasks"]}, cfg, training_ngrams(tiny_workdir, 13))
    assert seen["hhh_alignment"]["seen"] >= 1


@pytest.mark.parametrize(("cuda", "avx512_bf16", "amx", "expected"), [
    (False, False, False, "float32"),  # a CPU that converts bf16 to fp32 for every matmul
    (False, True, False, "bfloat16"), (False, False, True, "bfloat16"), (True, False, False, "bfloat16")])
def test_hardware_dtype_is_bf16_only_where_the_machine_computes_it(
        monkeypatch: pytest.MonkeyPatch, cuda: bool, avx512_bf16: bool, amx: bool, expected: str) -> None:
    import torch

    from stages.common.lm import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_dtype("hardware") == expected
    assert resolve_dtype("auto") is None and resolve_dtype("float16") == "float16"


def test_a_row_that_is_not_a_paths_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"evaluate\.models: .*\['policy'\] are not `paths` keys"):
        config(models=["base", "policy"])
    with pytest.raises(ConfigError, match=r"evaluate\.models: .*names a row twice"):
        config(models=["base", "base"])
    with pytest.raises(ConfigError, match=r"evaluate\.models: .*the judge and the proxy reward model are scored"):
        config(models=["base", "judge"])
    with pytest.raises(ConfigError, match=r"evaluate\.against: .*\['policy'\] are not `paths` keys"):
        config(against={"policy": "sft"})


# ---------------------------------------------------------------------------------------------
# the stage on tiny models


GOLD, OTHER = "and", "in"  # one token each, with and without a leading space, in the tiny tokenizer


def picking_model(paths: Paths, dest: Path, word: str) -> Path:
    """The tiny base rewired to answer `word` after any text: attention and MLP outputs zeroed, so
    the last hidden state is the current token's embedding; every embedding gets a constant first
    dimension, and `word`'s tokens (with and without a leading space: a chat template puts the answer
    right after a newline) a larger one, so with tied embeddings their logits win everywhere."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_model(paths, dest)
    tok = AutoTokenizer.from_pretrained(dest)
    tokens = [tok(w, add_special_tokens=False)["input_ids"] for w in (word, f" {word}")]
    assert all(len(t) == 1 for t in tokens), (word, tokens)
    model = AutoModelForCausalLM.from_pretrained(dest)
    assert model.config.tie_word_embeddings
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 1.0
        embed[[t[0] for t in tokens], 0] = 3.0
    model.save_pretrained(dest)
    return dest


def gold_task(task_dir: Path, n: int = 6) -> str:
    """A multiple-choice task whose gold answer is always GOLD, at either position."""
    data = task_dir / "pick.jsonl"
    write_jsonl(data, [{"q": f"Question {i}: which word?", "choices": [GOLD, OTHER] if i % 2 else [OTHER, GOLD],
                        "gold": 0 if i % 2 else 1} for i in range(n)])
    (task_dir / "pick.yaml").write_text(
        f"task: pick\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {data}}}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "target_delimiter: ' '\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return "pick"


def plant_test_pairs(paths: Paths, n: int = 6) -> None:
    """The preference data's test part: `n` questions whose chosen answer is GOLD, the rejected one
    OTHER; pairs of the other parts, which evaluate must leave alone (their chosen answer is OTHER)."""
    from stages.common.io import write_records

    records = [{"id": f"t/{i}", "source": "t" if i % 2 else "u", "prompt": f"Question {i}: which word?",
                "chosen": GOLD, "rejected": OTHER, "split": "test"} for i in range(n)]
    records += [{"id": f"r/{i}", "source": "t", "prompt": f"Other question {i}?", "chosen": OTHER, "rejected": GOLD,
                 "split": part} for i, part in enumerate(("reward", "judge", "policy"))]
    write_records(paths.dedup, "preferences", records)


def test_the_judge_and_the_proxy_score_every_row_and_an_aligned_row_is_set_against_sft(
        tiny_workdir: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three rows on one table: a model that always says GOLD (sft), the random base, and one that
    always says OTHER (ppo, set against sft); a judge that pays for GOLD (the test pairs' chosen
    answer) and a proxy that pays for OTHER (the policy chased a bad proxy). The benchmark, the
    judge's and the proxy's accuracy on the test pairs, their scores of each row's answers and the
    comparisons all see it: the proxy is up, the judge is down."""
    from transformers import AutoTokenizer

    from stages.common.lm import resolve_dtype
    from tests.stages.test_ppo import build_token_reward

    picking_model(tiny_workdir, tiny_workdir.sft, GOLD)
    picking_model(tiny_workdir, tiny_workdir.ppo, OTHER)
    tok = AutoTokenizer.from_pretrained(tiny_workdir.sft)
    for folder, word in ((tiny_workdir.judge, GOLD), (tiny_workdir.reward, OTHER)):
        build_token_reward(tiny_workdir.sft, folder, [tok(w, add_special_tokens=False)["input_ids"][0]
                                                      for w in (word, f" {word}")])
    plant_test_pairs(tiny_workdir)
    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the project
    task_dir = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, task_dir)
    tasks = {gold_task(task_dir): limits(None), "bigbench_arithmetic": limits(2, 4)}
    cfg = config(models=["sft", "base", "ppo"], task_dir=task_dir, tasks=tasks, perplexity_blocks=2,
                 preferences={"prompts": 6, "pairs": None, "answer_tokens": 4}, against={"ppo": "sft"})
    metrics = evaluate(cfg, tiny_workdir)
    models = metrics["models"]
    assert models["sft"]["pick"] == 1.0 and models["ppo"]["pick"] == 0.0
    assert list(models) == ["sft", "base", "ppo", "judge", "proxy"]  # evaluate.models, then the scorers
    assert metrics["folders"] == {**{row: str(getattr(tiny_workdir, row)) for row in ("base", "sft", "ppo", "judge")},
                                  "proxy": str(tiny_workdir.reward)}
    assert metrics["metric"] == {"perplexity": "token perplexity", "instruction_loss": "answer-token loss",
                                 "judge_score": "judge's mean score", "proxy_reward": "proxy's mean reward",
                                 "pick": "acc", "bigbench_arithmetic": "exact_match",
                                 "pairwise_accuracy": "pairwise acc"}
    assert metrics["skipped"] == {} and metrics["cells"] == 20 and metrics["cells_skipped"] == 0
    assert cfg.dtype == "hardware" and metrics["dtype"] == resolve_dtype("hardware")  # the rows' dtype is recorded
    assert metrics["items"]["judge_score"] == 6 and metrics["items"]["pairwise_accuracy"] == 6  # the test part only
    # every cell has its error; a share of 6 items that are all 1 has none
    assert set(metrics["stderr"]["base"]) == set(models["base"]) and metrics["stderr"]["sft"]["pick"] == 0.0
    # the rewired models predict one token everywhere: far worse than the random base on real text
    assert models["sft"]["perplexity"] > models["base"]["perplexity"]
    assert metrics["comparisons"]["base"]["against"] == "sft" and metrics["comparisons"]["base"]["perplexity"]["better"]
    # the judge prefers the chosen answer of every test pair, beyond chance; the proxy none of them
    assert models["judge"] == {"pairwise_accuracy": 1.0} and models["proxy"] == {"pairwise_accuracy": 0.0}
    assert metrics["comparisons"]["judge"]["pairwise_accuracy"]["better"]
    assert metrics["comparisons"]["proxy"]["against"] == "chance"
    assert not metrics["comparisons"]["proxy"]["pairwise_accuracy"]["better"]
    # ppo against sft (not the row before it): what the proxy pushed up, the judge finds worse
    against_sft = metrics["comparisons"]["ppo"]
    assert against_sft["against"] == "sft"
    assert against_sft["proxy_win_rate"]["value"] == 1.0 and against_sft["proxy_reward"]["low"] > 0
    assert against_sft["judge_win_rate"]["value"] == 0.0 and against_sft["judge_score"]["high"] < 0
    assert not against_sft["judge_score"]["better"]
    report = tiny_workdir.report_dir("evaluate")
    assert (report / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (report / "table.md").read_text()
    assert "| sft | " in table and "| 1.000 ± 0.000 |" in table and "| ppo | sft | judge_win_rate | 0.000 |" in table
    assert "| ppo | sft | proxy_win_rate | 1.000 |" in table and "| proxy | chance | pairwise_accuracy |" in table
    results = json.loads((report / "results/ppo.json").read_text())["results"]
    assert results["pick"]["acc,none"] == 0.0
    items = json.loads((report / "items/sft.json").read_text())
    assert len(items["pick"]) == 6 and len(items["perplexity"]) == 2 and set(items["judge_score"]) == \
        {f"t/{i}" for i in range(6)}
    answers = json.loads((report / "answers/ppo.json").read_text())
    assert all(not a["answer"].replace(OTHER, "").strip() for a in answers)  # OTHER, again and again
    assert all(a["proxy_reward"] > a["judge_score"] for a in answers)


def test_quantized_folders_become_one_row_each(tiny_workdir: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    for method in ("nf4", "int8"):
        tiny_model(tiny_workdir, tiny_workdir.quantized / method)
    (tiny_workdir.quantized / ".quantized.tmp-x").mkdir()  # a half-written folder is no row
    monkeypatch.chdir(ROOT)
    metrics = evaluate(config(models=["quantized"], tasks={}, perplexity_blocks=2), tiny_workdir, held_out=False)
    assert list(metrics["models"]) == ["quantized/int8", "quantized/nf4"]
    # no file of sft's held-out instructions: the instruction loss is a recorded skip, never re-derived
    assert f"{tiny_workdir.sft_held_out()} does not exist" in metrics["skipped"]["instruction_loss"]
    assert metrics["folders"]["quantized/nf4"] == str(tiny_workdir.quantized / "nf4")


def test_where_the_rows_run_in_float32_a_quantized_folders_bf16_parts_load_in_float32(
        tiny_workdir: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao int8 keeps the embedding and the norms in the dtype the model was loaded in (quantize
    saves them in bf16). Rows that run in float32 (`hardware` on a machine without bf16) load those
    parts in float32 too; rows in bfloat16 leave the folder as it is."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    from stages.common.cells import perplexity_cell
    from stages.common.lm import block_losses, load_causal_lm, val_blocks
    from stages.quantize import load_quantized

    src = tiny_model(tiny_workdir, tiny_workdir.ppo)
    folder = tiny_workdir.quantized / "torchao_int8"
    load_quantized(src, TorchAoConfig(Int8WeightOnlyConfig())).save_pretrained(folder)  # as quantize saves it
    monkeypatch.chdir(ROOT)
    cfg = config(models=["quantized"], tasks={}, perplexity_blocks=2, preferences=None)
    blocks = val_blocks(tiny_workdir.tokenized, 2)
    expected = {dtype: round(perplexity_cell(block_losses(load_causal_lm(folder, dtype=dtype), blocks,
                                                          cfg.batch_size)).value, 6)
                for dtype in ("float32", None)}
    assert expected["float32"] != expected[None]  # the dtype shows in the score
    for dtype, stored_as in (("float32", "float32"), ("bfloat16", None)):
        metrics = evaluate(cfg.model_copy(update={"dtype": dtype}), tiny_workdir, held_out=False)
        assert metrics["models"]["quantized/torchao_int8"]["perplexity"] == expected[stored_as], dtype


def test_bad_task_files_and_a_broken_model_are_recorded_skips(tiny_workdir: Paths, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for stage in ("sft", "ppo", "pretrain"):
        tiny_model(tiny_workdir, getattr(tiny_workdir, stage))
    (tiny_workdir.sft / "config.json").write_text("{ not json")
    config_file = tiny_workdir.pretrain / "config.json"  # a sequence classifier: no causal LM to score
    config_file.write_text(config_file.read_text().replace("LlamaForCausalLM", "LlamaForSequenceClassification"))
    quantized = tiny_workdir.quantized / "int8"  # a quantized folder that is not a model
    quantized.mkdir(parents=True)
    task_dir = tmp_path / "tasks"
    shutil.copytree(TASK_DIR, task_dir)
    # data that is not there, and a YAML that does not parse
    (task_dir / "hhh_alignment.yaml").write_text(
        (TASK_DIR / "hhh_alignment.yaml").read_text().replace("hhh_alignment.jsonl", "missing.jsonl"))
    (task_dir / "truthful_qa_mc.yaml").write_text("task: truthful_qa_mc\ndataset_path: [unclosed\n")
    monkeypatch.chdir(ROOT)
    tasks = {**TASKS, "truthful_qa_mc": limits(2), "no_such_task": limits(2)}
    cfg = config(models=["base", "sft", "ppo", "pretrain", "quantized"], task_dir=task_dir, tasks=tasks,
                 perplexity_blocks=2)
    metrics = evaluate(cfg, tiny_workdir)
    skipped = metrics["skipped"]
    assert set(metrics["models"]) == {"base", "ppo"}
    assert "does not load" in skipped["sft"]
    assert "LlamaForSequenceClassification, not a causal LM" in skipped["pretrain"]
    assert "no config.json" in skipped["quantized/int8"]
    assert "does not load" in skipped["hhh_alignment"]
    assert "truthful_qa_mc" in skipped and "no_such_task" in skipped
    # the good task still ran on every model that loads
    for row in ("base", "ppo"):
        assert set(metrics["models"][row]) == {"perplexity", "instruction_loss", "bigbench_arithmetic"}
    assert f"no judge model in {tiny_workdir.judge}" in skipped["judge_score"] == skipped["judge"]
    assert f"no proxy model in {tiny_workdir.reward}" in skipped["proxy_reward"] == skipped["proxy"]
    table = (tiny_workdir.report_dir("evaluate") / "table.md").read_text()
    assert "| sft |" not in table and "- `sft`:" in table


def test_a_judge_that_does_not_load_skips_its_cells_and_the_proxy_still_scores(
        tiny_workdir: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.stages.test_ppo import build_token_reward

    tiny_model(tiny_workdir, tiny_workdir.sft)
    build_token_reward(tiny_workdir.sft, tiny_workdir.reward, [5])
    tiny_workdir.judge.mkdir(parents=True, exist_ok=True)
    (tiny_workdir.judge / "config.json").write_text("{ not json")  # there, but not a model
    monkeypatch.chdir(ROOT)
    metrics = evaluate(config(models=["sft"], tasks=TASKS, perplexity_blocks=2), tiny_workdir)
    for cell in ("judge_score", "judge"):
        assert f"the judge model in {tiny_workdir.judge} does not load" in metrics["skipped"][cell]
    assert "judge" not in metrics["models"] and "judge_score" not in metrics["models"]["sft"]
    assert {"perplexity", "instruction_loss", "proxy_reward", "hhh_alignment"} <= set(metrics["models"]["sft"])
    # the tiny data's own test part (real hhh pairs collect put there)
    assert metrics["items"]["pairwise_accuracy"] > 0 and set(metrics["models"]["proxy"]) == {"pairwise_accuracy"}
    assert metrics["cells_skipped"] == 2  # the judge's row and its column of the one model row


def test_rows_name_every_quantized_folder_or_one_of_them(paths: Paths) -> None:
    from stages.evaluate import model_rows

    for method in ("int8", "hqq"):
        (paths.quantized / method).mkdir(parents=True)
        (paths.quantized / method / "config.json").write_text("{}")
    every = model_rows(config(models=["ppo", "quantized"]), paths)
    assert list(every) == ["ppo", "quantized/hqq", "quantized/int8"]
    one = model_rows(config(models=["ppo", "quantized/int8"]), paths)
    assert one == {"ppo": paths.ppo, "quantized/int8": paths.quantized / "int8"}
    with pytest.raises(ConfigError, match="not `paths` keys"):
        config(models=["quantised/int8"])


# ---------------------------------------------------------------------------------------------
# the cells' arithmetic: the fast paths give the full forward's numbers


def test_losses_and_answers_are_those_of_the_full_forward_one_item_at_a_time(
        tiny_workdir: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """block_losses and answer_losses take the output layer at the positions they score only, and
    greedy batches prompts by length: the same losses as the whole model's logits, item by item,
    and the same answers, in the prompts' order, as each prompt generated alone."""
    import torch

    from stages.common import lm

    folder = tiny_model(tiny_workdir, tmp_path / "model")
    model, tok = lm.load_causal_lm(folder), lm.load_tokenizer(folder)
    blocks = lm.val_blocks(tiny_workdir.tokenized, 3)
    with torch.no_grad():
        full = [torch.nn.functional.cross_entropy(model(input_ids=b[None]).logits[0, :-1], b[1:]).item()
                for b in blocks]
    assert lm.block_losses(model, blocks, 2) == pytest.approx(full, abs=1e-5)

    words = ["alpha", "beta gamma delta", "epsilon", "zeta eta theta iota kappa lambda"]
    examples = [{"id": str(i), "prompt": [{"role": "user", "content": f"Say {w}, please."}],
                 "completion": [{"role": "assistant", "content": " ".join(words[-1 - i:])}]}
                for i, w in enumerate(words)]
    expected = []
    with torch.no_grad():
        for ex in examples:
            start = len(tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"])
            ids = torch.tensor([tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=True,
                                                        return_dict=True)["input_ids"]])
            logits = model(input_ids=ids).logits[0, start - 1:-1]
            expected.append(torch.nn.functional.cross_entropy(logits, ids[0, start:]).item())
    assert lm.answer_losses(model, tok, examples, 3) == pytest.approx(expected, abs=1e-4)
    monkeypatch.setattr(model, "get_decoder", lambda: None)  # no decoder to call: the full logits
    assert lm.last_hidden(model, blocks[:1]) is None
    assert lm.answer_losses(model, tok, examples, 3) == pytest.approx(expected, abs=1e-4)
    assert lm.block_losses(model, blocks, 2) == pytest.approx(full, abs=1e-5)

    prompts = [[{"role": "user", "content": f"Tell me about {w}."}] for w in words]
    alone = [lm.greedy(model, tok, [p], 5)[0] for p in prompts]
    assert lm.greedy(model, tok, prompts, 5, batch_size=2) == alone
