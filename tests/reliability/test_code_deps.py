"""Each `dvc.yaml` stage lists exactly the project code its module imports (scripts/code_deps.py),
so an edit reruns only the stages it can change: the lists match the import closures, and in a
tiny-profile project an edit to a module only dedup imports leaves every training stage up to date."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from scripts import code_deps
from tests.conftest import ROOT, run_in

TRAINING = ("pretrain", "sft", "reward", "dpo", "ppo")


def test_every_stage_lists_exactly_the_code_it_imports() -> None:
    assert code_deps.problems(ROOT / "dvc.yaml", ROOT) == {}
    # lazy imports count: the training stages import their helpers inside functions too
    assert "stages/common/training.py" in code_deps.expected("python -m stages.sft", ROOT)
    assert "stages/common/minhash.py" not in code_deps.expected("python -m stages.sft", ROOT)


def test_a_missing_or_an_extra_code_dep_is_named(tmp_path: Path) -> None:
    graph = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    deps = graph["stages"]["dedup"]["deps"]
    deps.remove("stages/common/minhash.py")
    deps.append("stages/common/quantizers.py")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(graph, sort_keys=False))
    assert code_deps.problems(tmp_path / "dvc.yaml", ROOT) == {
        "dedup": (["stages/common/quantizers.py"], ["stages/common/minhash.py"])}
    assert code_deps.write(tmp_path / "dvc.yaml", ROOT) == ["dedup"]
    assert code_deps.problems(tmp_path / "dvc.yaml", ROOT) == {}


def test_an_edit_to_dedups_own_module_leaves_the_training_stages_up_to_date(tiny_project: Path,
                                                                           tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(tiny_project, project, symlinks=True)
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]

    def stale() -> set[str]:
        return set(json.loads(run_in(project, "-m", "dvc", "status", "--json").stdout or "{}"))

    before = stale()
    minhash = project / "stages/common/minhash.py"
    minhash.write_text(minhash.read_text() + "# an edit\n")
    importers = {name for name, spec in stages.items()
                 if "stages/common/minhash.py" in code_deps.expected(spec["cmd"], project)}
    assert importers == {"dedup"}
    assert stale() - before == importers
    assert not stale() & set(TRAINING)
