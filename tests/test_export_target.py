"""Nothing a user owns is overwritten: `bestrq-export` writes only where nothing is, or over an
unchanged earlier export of its own; never into data/, never over its own inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bestrq.adapter import export_merged, save_vectors
from bestrq.adapters.ia3 import add_ia3
from bestrq.export_target import MARKER, ExportTargetError, check_target, sidecar
from bestrq.whisper_model import (
    TINY_TEST_DIMS,
    load_whisper,
    model_identity,
    random_whisper,
    save_whisper_checkpoint,
)


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file below `root` (or of `root` itself), by relative path."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root.parent).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A project folder: a random base checkpoint, an IA^3 adapter in data/adapters, and files
    of the user's own (README.md, a folder with a config.json and code)."""
    monkeypatch.chdir(tmp_path)
    base_path = tmp_path / "base.pt"
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), base_path, half=False)
    base = load_whisper(str(base_path))
    add_ia3(base)
    save_vectors(tmp_path / "data" / "adapters" / "adapter-only.safetensors", base,
                 model_identity(str(base_path), base), {})
    (tmp_path / "README.md").write_text("# my notes\n")
    (tmp_path / "myproject" / "src").mkdir(parents=True)
    (tmp_path / "myproject" / "config.json").write_text('{"mine": true}\n')
    (tmp_path / "myproject" / "src" / "main.py").write_text("print('mine')\n")
    return tmp_path


def _export(*args: str):
    from stages.export import app

    return CliRunner().invoke(app, [*args, "--base", "base.pt",
                                    "--adapter", "data/adapters/adapter-only.safetensors"])


def test_export_refuses_a_users_file_or_folder_and_changes_nothing(project: Path) -> None:
    before = {**_digests(project / "README.md"), **_digests(project / "myproject"),
              **_digests(project / "data")}
    for out, fmt in (("README.md", "openai"), ("myproject", "hf"), ("myproject", "ct2"),
                     ("data/adapters/adapter-only.safetensors", "openai"),
                     ("data/new.pt", "openai"),
                     ("base.pt", "openai")):
        result = _export(out, "--format", fmt)
        assert result.exit_code == 1, (out, fmt, result.output)
        assert out.split("/")[0] in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output  # one line
    after = {**_digests(project / "README.md"), **_digests(project / "myproject"),
             **_digests(project / "data")}
    assert after == before
    assert sorted(p.name for p in project.iterdir()) == [
        "README.md", "base.pt", "data", "myproject"]  # nothing new either


def test_an_export_may_replace_its_own_unchanged_output_only(project: Path) -> None:
    first = export_merged("data/adapters/adapter-only.safetensors", "base.pt", "merged.pt")
    record = json.loads(sidecar(first).read_text())
    assert record["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    again = export_merged("data/adapters/adapter-only.safetensors", "base.pt", "merged.pt")
    assert again.read_bytes() == first.read_bytes()
    # Changed after the export: it is no longer ours to replace.
    with open(first, "ab") as f:
        f.write(b"user's edit")
    with pytest.raises(ExportTargetError, match="merged.pt exists and is not an unchanged"):
        export_merged("data/adapters/adapter-only.safetensors", "base.pt", "merged.pt")


def test_a_folder_export_lists_its_files_and_a_users_addition_protects_it(project: Path
                                                                          ) -> None:
    pytest.importorskip("transformers")
    out = export_merged("data/adapters/adapter-only.safetensors", "base.pt", "merged-hf", "hf")
    listed = json.loads((out / MARKER).read_text())
    assert listed["format"] == "hf" and "config.json" in listed["files"]
    assert set(listed["files"]) == {p.name for p in out.iterdir()} - {MARKER}
    export_merged("data/adapters/adapter-only.safetensors", "base.pt", "merged-hf", "hf")  # its own
    with pytest.raises(ExportTargetError, match="not an unchanged earlier ct2 export"):
        check_target(out, "ct2")  # another format's folder
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(ExportTargetError, match="merged-hf exists"):
        export_merged("data/adapters/adapter-only.safetensors", "base.pt", "merged-hf", "hf")
    assert (out / "notes.txt").read_text() == "mine\n"
    # A Hugging Face base folder is an input: never the output.
    with pytest.raises(ExportTargetError, match="an input of this export"):
        check_target(out / "sub", "hf", inputs=[out])


def test_empty_folder_and_new_path_are_fine_links_are_not(project: Path) -> None:
    (project / "empty").mkdir()
    assert check_target("empty", "hf") == (project / "empty").resolve()
    assert check_target("new/merged.pt", "openai") == (project / "new" / "merged.pt").resolve()
    (project / "link.pt").symlink_to(project / "README.md")
    with pytest.raises(ExportTargetError, match="link.pt"):
        check_target("link.pt", "openai")
