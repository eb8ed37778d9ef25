"""scripts/commit_cells.py commits finished cells' small files as a sweep goes, nothing else; the
repository's .gitignore keeps adapters and checkpoints of the CPU sweeps out."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

from conftest import REPO

spec = importlib.util.spec_from_file_location("commit_cells", REPO / "scripts" / "commit_cells.py")
commit_cells = importlib.util.module_from_spec(spec)
spec.loader.exec_module(commit_cells)


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def cell(root, name, status=None, failed=False):
    run = root / "smollm2_135m" / name / "sst2" / "seed0"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter.safetensors").write_bytes(b"weights")
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "last.safetensors").write_bytes(b"state")
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "predictions.jsonl").write_text("{}\n")
    if status:
        (run / "metrics.json").write_text(json.dumps({"status": status}))
    if failed:
        (run / "failed.json").write_text(json.dumps({"status": "failed"}))
    return run


def test_only_finished_cells_small_files_are_committed(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / "code.py").write_text("x = 1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    (repo / "code.py").write_text("x = 2\n")
    git(repo, "add", "code.py")                                  # staged work of someone else stays staged
    root = repo / "results" / "cpu_table1" / "runs"
    cell(root, "lora", status="complete")
    cell(root, "parade", failed=True)
    cell(root, "ia3")                                            # in flight: no metrics.json yet
    cell(root, "bitfit", status="running")
    monkeypatch.chdir(repo)
    assert commit_cells.commit_finished(root.relative_to(repo)) == 2
    committed = set(git(repo, "show", "--name-only", "--format=", "HEAD").split())
    base = "results/cpu_table1/runs/smollm2_135m"
    assert committed == {f"{base}/lora/sst2/seed0/{f}" for f in ("metrics.json", "config.yaml", "predictions.jsonl")} \
        | {f"{base}/parade/sst2/seed0/{f}" for f in ("failed.json", "config.yaml", "predictions.jsonl")}
    assert git(repo, "diff", "--cached", "--name-only").split() == ["code.py"]
    assert commit_cells.commit_finished(root.relative_to(repo)) == 0         # nothing new
    status = git(repo, "status", "--porcelain", "--untracked-files=all")
    assert "adapter" not in status and "checkpoint" not in status and "ia3/sst2/seed0/config.yaml" in status
