"""What `bestrq-export` writes and reads: a bad --adapter file is one line naming it, an
openai checkpoint's bytes do not depend on the temporary it was written through, and every
file written follows the umask as `open` does."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bestrq.adapter import export_merged, save_vectors
from bestrq.adapters.ia3 import add_ia3
from bestrq.peft_adapter import export_peft
from bestrq.whisper_model import (
    TINY_TEST_DIMS,
    load_whisper,
    model_identity,
    random_whisper,
    save_whisper_checkpoint,
)

ADAPTER = "adapter-only.safetensors"


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A folder with a random base checkpoint and an IA^3 adapter for it."""
    monkeypatch.chdir(tmp_path)
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), tmp_path / "base.pt", half=False)
    base = load_whisper("base.pt")
    add_ia3(base)
    save_vectors(tmp_path / ADAPTER, base, model_identity("base.pt", base), {})
    return tmp_path


def _export(out: str, adapter: str, *args: str):
    from stages.export import app

    return CliRunner().invoke(app, [out, "--base", "base.pt", "--adapter", adapter, *args])


def test_a_bad_adapter_file_is_one_line_naming_it(project: Path) -> None:
    whole = (project / ADAPTER).read_bytes()
    bad = {"notes.md": b"# my notes\n" * 40, "empty.safetensors": b"",
           "header.safetensors": whole[:100], "short.safetensors": whole[:-10],
           "json.safetensors": whole[:8] + b"{bad json" + whole[17:]}
    for name, data in bad.items():
        (project / name).write_bytes(data)
    for name in bad:
        for fmt in ("openai", "peft"):
            result = _export(f"out-{fmt}", name, "--format", fmt)
            assert result.exit_code == 1, (name, result.output)
            assert result.output.startswith(f"error: adapter file {name} is not a readable "
                                            "safetensors adapter: "), (name, result.output)
            assert len(result.output.strip().splitlines()) == 1, result.output
    assert not list(project.glob("out-*"))  # refused before anything was written


def test_two_openai_exports_of_one_adapter_are_the_same_bytes(project: Path) -> None:
    """The checkpoint is written through a temporary of a random name beside it: that name
    must not reach the zip archive torch.save writes."""
    first = export_merged(ADAPTER, "base.pt", "one.pt")
    second = export_merged(ADAPTER, "base.pt", project / "sub" / "two.pt")
    data = first.read_bytes()
    assert data == second.read_bytes()
    again = export_merged(ADAPTER, "base.pt", "one.pt")  # over its own earlier export
    assert again.read_bytes() == data
    names = zipfile.ZipFile(first).namelist()
    assert {n.split("/")[0] for n in names} == {"archive"}
    assert torch.load(first, weights_only=True)["dims"] == vars(TINY_TEST_DIMS)


def _modes(root: Path) -> dict[str, int]:
    """The permission bits of every file below `root`, by path relative to it."""
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_every_file_written_follows_the_umask(tmp_path: Path, monkeypatch, mask: int,
                                              mode: int) -> None:
    """safetensors writes through a 0600 temporary of its own: adapters, openai checkpoints
    and their sidecars, PEFT and Hugging Face folders all get 0666 less the umask."""
    monkeypatch.chdir(tmp_path)
    old = os.umask(mask)
    try:
        save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), "base.pt", half=False)
        base = load_whisper("base.pt")
        add_ia3(base)
        save_vectors(tmp_path / "out" / ADAPTER, base, model_identity("base.pt", base), {})
        adapter = tmp_path / "out" / ADAPTER
        export_merged(adapter, "base.pt", tmp_path / "out" / "merged.pt")
        export_peft(adapter, tmp_path / "out" / "peft")
        if mask == 0o022:  # the slow one (tokenizer files) once
            pytest.importorskip("transformers")
            export_merged(adapter, "base.pt", tmp_path / "out" / "hf", "hf")
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "out")
    expected = {ADAPTER, "adapter-only.json", "merged.pt", "merged.pt.bestrq-export.json",
                "peft/adapter_model.safetensors", "peft/adapter_config.json"}
    assert expected <= set(modes)
    if mask == 0o022:
        assert {"hf/model.safetensors", "hf/config.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, mode)
