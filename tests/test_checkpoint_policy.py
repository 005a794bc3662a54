"""Checkpoint folders: only ours are changed, changes are named, one writer at a time."""

import fcntl
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bestrq.checkpoint import (
    KILL_ENV,
    LOCK,
    MARKER,
    RECORD,
    CheckpointFolderError,
    claim_checkpoints,
    folder_fingerprint,
    list_checkpoints,
    load_latest,
    run_signature,
    save_checkpoint,
)
from bestrq.run_identity import checkpoint_key
from bestrq.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
VALUES = {"codebook_size": 8192, "max_steps": 30, "lr_schedule": "inverse_sqrt",
          "num_workers": 2, "finetune": {"max_steps": 15, "checkpoint_every": 5}}


def signature(inputs: dict | None = None, **changes):
    values = {**VALUES, **changes}
    return run_signature(values, inputs or {"features": b"stats"},
                         extendable=() if values["lr_schedule"] == "cosine" else ("max_steps",),
                         ignore=("num_workers", "checkpoint_every"))


def state(value: float) -> dict:
    return {"w": torch.full((2,), value)}


def first_run(directory: Path, steps=(10, 20, 30), **changes) -> str:
    """A run that made checkpoints at `steps` and ended; its fingerprint."""
    sig = signature(**changes)
    with claim_checkpoints(directory, sig) as claim:
        assert claim.start == 0
        for step in steps:
            save_checkpoint(directory, step, state(float(step)))
    return sig.fingerprint


def test_fresh_folder_is_marked_and_records_its_values(tmp_path):
    ck = tmp_path / "a" / "checkpoints"
    sig = signature()
    with claim_checkpoints(ck, sig) as claim:
        assert claim.start == 0
    assert (ck / MARKER).read_text().split() == ["bestrq-checkpoints/2", sig.fingerprint]
    record = json.loads((ck / RECORD).read_text())
    assert record["values"]["codebook_size"] == 8192
    assert record["values"]["finetune.max_steps"] == 15  # nested values are dotted
    assert "num_workers" not in record["values"]  # speed knobs are not part of a run's identity
    assert "finetune.checkpoint_every" not in record["values"]


def test_same_values_resume_and_speed_knobs_do_not_matter(tmp_path):
    first_run(tmp_path)
    messages = []
    with claim_checkpoints(tmp_path, signature(num_workers=8), messages.append) as claim:
        assert claim.start == 30
    assert messages == []
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]


def test_foreign_folder_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "step-00000001.pt").write_bytes(b"not ours either")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointFolderError) as err:
        claim_checkpoints(tmp_path, signature())
    message = str(err.value)
    assert str(tmp_path) in message and "nothing was deleted" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # not even a lock file
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_stray_old_style_marker_does_not_make_a_folder_ours(tmp_path):
    (tmp_path / MARKER).write_text("ab" * 32 + "\n")
    (tmp_path / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointFolderError, match="thesis.tex"):
        claim_checkpoints(tmp_path, signature())
    assert (tmp_path / "thesis.tex").exists()


def test_changed_parameter_moves_checkpoints_aside_naming_it(tmp_path):
    ck = tmp_path / "checkpoints"
    first_run(ck)
    messages = []
    with claim_checkpoints(ck, signature(codebook_size=4096), messages.append) as claim:
        assert claim.start == 0
    stale = tmp_path / "checkpoints.stale"
    assert len(messages) == 1
    assert "codebook_size: 8192 -> 4096" in messages[0]
    assert str(ck) in messages[0] and str(stale) in messages[0]
    assert [s for s, _ in list_checkpoints(stale)] == [20, 30]  # kept, not deleted
    assert list_checkpoints(ck) == []
    assert folder_fingerprint(ck) == signature(codebook_size=4096).fingerprint

    # A second change replaces the older stale copy (ours, and announced when it was made).
    save_checkpoint(ck, 5, state(5.0))
    with claim_checkpoints(ck, signature(codebook_size=1024), messages.append):
        pass
    assert "codebook_size: 4096 -> 1024" in messages[1] and "replacing" in messages[1]
    assert [s for s, _ in list_checkpoints(stale)] == [5]


def test_changed_input_is_named(tmp_path):
    first_run(tmp_path / "ck")
    messages = []
    with claim_checkpoints(tmp_path / "ck", signature({"features": b"other stats"}),
                           messages.append):
        pass
    assert "features changed" in messages[0]


def test_raising_max_steps_extends_the_run_and_says_so(tmp_path):
    first_run(tmp_path)
    messages = []
    with claim_checkpoints(tmp_path, signature(max_steps=60), messages.append) as claim:
        assert claim.start == 30
    assert len(messages) == 1
    assert "max_steps: 30 -> 60" in messages[0] and "continuing" in messages[0]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]
    assert json.loads((tmp_path / RECORD).read_text())["values"]["max_steps"] == 60


def test_max_steps_below_the_newest_checkpoint_starts_over(tmp_path):
    ck = tmp_path / "ck"
    first_run(ck)
    messages = []
    with claim_checkpoints(ck, signature(max_steps=25), messages.append) as claim:
        assert claim.start == 0
    assert "max_steps: 30 -> 25 is below the newest checkpoint (step 30)" in messages[0]
    assert [s for s, _ in list_checkpoints(tmp_path / "ck.stale")] == [20, 30]


def test_with_a_cosine_schedule_max_steps_is_a_new_run(tmp_path):
    features = tmp_path / "features"
    (features / "train").mkdir(parents=True)
    (features / "stats.json").write_text("{}")
    (features / "train" / "index.json").write_text("[]")
    values = {"max_steps": 30, "lr_schedule": "cosine", "num_workers": 2}
    cosine = TrainConfig(lr_schedule="cosine", warmup_steps=4, heads_only_steps=2, max_steps=30)
    ck = tmp_path / "ck"
    with claim_checkpoints(ck, checkpoint_key(values, features, cosine)):
        save_checkpoint(ck, 30, state(30.0))
    messages = []
    longer = checkpoint_key({**values, "max_steps": 60}, features,
                            replace(cosine, max_steps=60))
    with claim_checkpoints(ck, longer, messages.append) as claim:
        assert claim.start == 0  # every rate after warm-up depends on max_steps
    assert "max_steps: 30 -> 60" in messages[0]
    # Not with the inverse_sqrt schedule (and warm-up in updates), and not for a speed knob.
    values["lr_schedule"] = "inverse_sqrt"
    inverse_sqrt = replace(cosine, lr_schedule="inverse_sqrt")
    with claim_checkpoints(ck, checkpoint_key(values, features, inverse_sqrt)):
        save_checkpoint(ck, 30, state(30.0))
    again = checkpoint_key({**values, "max_steps": 60, "num_workers": 0}, features,
                           replace(inverse_sqrt, max_steps=60))
    with claim_checkpoints(ck, again) as claim:
        assert claim.start == 30


def test_finetune_runs_are_keyed_by_their_section_and_world_size(tmp_path):
    from bestrq.params import load_params
    from bestrq.run_identity import finetune_key, pretrain_key

    features = tmp_path / "features"
    (features / "train").mkdir(parents=True)
    (features / "stats.json").write_text("{}")
    (features / "train" / "index.json").write_text("[]")
    p = load_params(REPO / "params.yaml")

    def key(start: str, nproc: int = 1, seed: int = 0):
        return finetune_key(replace(p, run=replace(p.run, nproc=nproc)), features, start, seed,
                            b"vectors" if start == "adapted" else None)

    stock = key("stock")
    assert stock.extendable == ("finetune.max_steps",)  # its schedule is constant
    assert "finetune.checkpoint_every" not in stock.values  # a speed knob
    assert "starting adapter" in key("adapted").inputs
    assert len({stock.fingerprint, key("adapted").fingerprint, key("stock", 2).fingerprint,
                key("stock", seed=1).fingerprint}) == 4  # each seed's run is its own
    pretrain = pretrain_key(p, features)
    assert pretrain.extendable == ("max_steps",) and "nproc" in pretrain.values
    assert not {"num_workers", "device", "log_every", "download.source"} & set(pretrain.values)


def test_one_identity_rule_for_pretrain_and_finetune(tmp_path):
    """A run is keyed by every knob of the configs it is built from, but the declared
    speed-only ones: pretrain by all top-level knobs, a fine-tune by the engine, adapter and
    finetune configs whole. No knob needs listing to key a run, so none resumes a stale one."""
    from bestrq.params import SECTION_MODELS, SPEED_ONLY, TopLevel, load_params
    from bestrq.run_identity import finetune_key, pretrain_key

    declared = set(TopLevel.model_fields).union(*(m.model_fields for m in
                                                  SECTION_MODELS.values()))
    assert set(SPEED_ONLY) <= declared  # each speed-only name is a real knob
    features = tmp_path / "features"
    (features / "train").mkdir(parents=True)
    (features / "stats.json").write_text("{}")
    (features / "train" / "index.json").write_text("[]")
    base = load_params(REPO / "params.yaml")

    def keys(p) -> tuple[str, str]:
        fine = finetune_key(p, features, "stock", 0, None).fingerprint
        pre = pretrain_key(p, features).fingerprint
        return pre, fine

    pre, fine = keys(base)
    # Knobs named nowhere in the fine-tune's code key it through its configs.
    for changed in (replace(base.train, max_nonfinite=9), replace(base.train, adam_eps=1e-6)):
        assert keys(replace(base, train=changed))[1] != fine
    assert keys(replace(base, adapter=replace(base.adapter, lora_alpha=8.0)))[1] != fine
    assert keys(replace(base, finetune=replace(base.finetune, max_minutes=1.0)))[1] != fine
    # A BEST-RQ knob keys the pre-training, not the stock fine-tune; a new top-level knob the
    # pre-training; a speed knob neither.
    raw = {**base.raw, "mask_prob": 0.02}
    assert keys(replace(base, raw=raw))[0] != pre
    assert keys(replace(base, raw=raw))[1] == fine
    # The top-level seed is BEST-RQ's: the fine-tune trains with its own (finetune.seeds).
    reseeded = replace(base, raw={**base.raw, "seed": 7}, train=replace(base.train, seed=7))
    assert keys(reseeded)[0] != pre and keys(reseeded)[1] == fine
    assert keys(replace(base, raw={**base.raw, "new_knob": 1}))[0] != pre
    speed = replace(base, raw={**base.raw, "num_workers": 0, "heldout_every": 7},
                    train=replace(base.train, num_workers=0, log_every=3, device="cpu"))
    assert keys(speed) == (pre, fine)


def test_folder_of_the_previous_version_is_moved_aside(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / MARKER).write_text("0f" * 32 + "\n")  # the bare sha256 marker of before
    (ck / "step-00000010.pt").write_bytes(b"old format")
    messages = []
    with claim_checkpoints(ck, signature(), messages.append) as claim:
        assert claim.start == 0
    assert "earlier version" in messages[0]
    assert (tmp_path / "ck.stale" / "step-00000010.pt").read_bytes() == b"old format"


def test_a_stale_name_taken_by_something_else_stops_the_run(tmp_path):
    ck = tmp_path / "ck"
    first_run(ck)
    (tmp_path / "ck.stale").mkdir()
    (tmp_path / "ck.stale" / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(CheckpointFolderError, match="ck.stale"):
        claim_checkpoints(ck, signature(codebook_size=4096))
    assert (tmp_path / "ck.stale" / "photo.jpg").exists()
    assert [s for s, _ in list_checkpoints(ck)] == [20, 30]
    assert folder_fingerprint(ck) == signature().fingerprint


def test_a_changed_folder_without_checkpoints_is_just_marked_again(tmp_path):
    with claim_checkpoints(tmp_path / "ck", signature()):
        pass  # killed before its first checkpoint
    messages = []
    with claim_checkpoints(tmp_path / "ck", signature(codebook_size=16), messages.append):
        pass
    assert messages == [] and not (tmp_path / "ck.stale").exists()


def test_first_run_killed_before_its_marker_leaves_a_usable_folder(tmp_path):
    (tmp_path / LOCK).write_text("123\n")
    (tmp_path / ".tmp-marker-abc").write_text("half")
    with claim_checkpoints(tmp_path, signature()) as claim:
        assert claim.start == 0


# ----------------------------------------------------------------------------- extending a run

# The engine's knobs of a small, fast, fp32 pre-training (precision fixed: `auto` is bf16 on
# some CPUs); the schedule's are each test's.
FAST = {"batch_size": 2, "num_workers": 0, "checkpoint_every": 4, "precision": "fp32",
        "device": "cpu", "lr_schedule": "inverse_sqrt"}


@pytest.fixture
def features(tmp_path):
    """The files a pre-training's identity hashes (their contents do not matter here)."""
    features = tmp_path / "features"
    (features / "train").mkdir(parents=True)
    (features / "stats.json").write_text("{}")
    (features / "train" / "index.json").write_text("[]")
    return features


@pytest.fixture
def one_thread():
    """One intra-op thread for the small runs: on a busy machine OpenMP's spinning workers
    make them twenty times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pretrain_in(ck: Path, features: Path, messages: list[str], **knobs) -> tuple[int, dict]:
    """What the pretrain recipe does with its checkpoint folder, on a small random Whisper:
    claim `ck` under the run's identity (`pretrain_key` of params.yaml with `knobs`) and train
    from the step the claim gives. (That step, the adapter file's tensors.)"""
    from _train_worker import RandomClips, small_model

    from bestrq.params import load_params
    from bestrq.pretraining import BEST_RQ
    from bestrq.run_identity import pretrain_key
    from bestrq.train import train

    p = load_params(REPO / "params.yaml", {**FAST, **knobs})
    model = small_model()
    with claim_checkpoints(ck, pretrain_key(p, features), messages.append) as claim:
        result = train(model, RandomClips(6), p.train, ck, objective=BEST_RQ)
    assert result.step == p.train.max_steps
    return claim.start, model.adapter_state_dict()


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.usefixtures("one_thread")
def test_a_share_based_schedule_is_not_extended_when_its_updates_would_differ(tmp_path,
                                                                            features):
    # The default schedule: warm-up and heads-only phase as shares of max_steps. Under 16
    # updates the warm-up is 4 updates, under 24 it is 6: the first 16 updates of a 24-update
    # run are not those of the 16-update run, so "continuing" it would end elsewhere.
    shares = {"warmup_steps": 0.25, "heads_only_steps": 0.1}
    ck, messages = tmp_path / "ck", []
    assert pretrain_in(ck, features, messages, max_steps=16, **shares)[0] == 0
    start, extended = pretrain_in(ck, features, messages, max_steps=24, **shares)
    assert start == 0  # started afresh, the 16-update run's checkpoints set aside
    assert len(messages) == 1
    assert "max_steps: 16 -> 24: warmup_steps 0.25 of max_steps is 4 updates under 16 and 6 " \
           "under 24" in messages[0]
    assert f"moved them to {tmp_path / 'ck.stale'}" in messages[0]
    assert [s for s, _ in list_checkpoints(tmp_path / "ck.stale")] == [12, 16]
    fresh = pretrain_in(tmp_path / "fresh", features, [], max_steps=24, **shares)[1]
    assert_same_tensors(extended, fresh)


@pytest.mark.usefixtures("one_thread")
def test_an_absolute_schedule_is_extended_and_ends_as_a_fresh_run(tmp_path, features):
    absolute = {"warmup_steps": 4, "heads_only_steps": 2}
    ck, messages = tmp_path / "ck", []
    pretrain_in(ck, features, messages, max_steps=16, **absolute)
    start, extended = pretrain_in(ck, features, messages, max_steps=24, **absolute)
    assert start == 16  # 8 updates run, not 24
    assert len(messages) == 1 and "max_steps: 16 -> 24: continuing" in messages[0]
    assert not (tmp_path / "ck.stale").exists()
    fresh = pretrain_in(tmp_path / "fresh", features, [], max_steps=24, **absolute)[1]
    assert_same_tensors(extended, fresh)


def test_what_an_extension_would_change_is_named():
    from bestrq.run_identity import extension_differs

    config = TrainConfig(warmup_steps=4, heads_only_steps=0.1, max_steps=16)
    assert extension_differs(config, replace(config, max_steps=25), 16) == \
        "heads_only_steps 0.1 of max_steps is 2 updates under 16 and 3 under 25"
    assert extension_differs(config, replace(config, max_steps=24), 16) is None
    # Shares that come to the same lengths under both limits (warm-up 4 and heads-only 2
    # under 16 and 17 updates) give the same updates: such a run is extended.
    shares = replace(config, warmup_steps=0.25)
    assert extension_differs(shares, replace(shares, max_steps=17), 16) is None
    assert extension_differs(shares, replace(shares, max_steps=18), 16) == \
        "warmup_steps 0.25 of max_steps is 4 updates under 16 and 5 under 18"
    cosine = TrainConfig(lr_schedule="cosine", warmup_steps=4, heads_only_steps=0,
                         max_steps=16)
    # Within the warm-up (and the rate of the update after it) the limit does not matter...
    assert extension_differs(cosine, replace(cosine, max_steps=24), 3) is None
    # ...after it, every rate does.
    assert extension_differs(cosine, replace(cosine, max_steps=24), 4) == \
        "the cosine schedule gives update 5 0.982963x the peak rate under 16 and 0.993844x " \
        "under 24"


def test_an_extension_without_the_record_of_its_limit_starts_afresh(tmp_path, features):
    from bestrq.params import load_params
    from bestrq.run_identity import pretrain_key

    def key(**knobs):
        return pretrain_key(load_params(REPO / "params.yaml", {**FAST, **knobs}), features)

    lengths = {"shares": {"warmup_steps": 0.25, "heads_only_steps": 0.1},
               "updates": {"warmup_steps": 4, "heads_only_steps": 2}}
    for name, schedule in lengths.items():
        ck = tmp_path / name
        with claim_checkpoints(ck, key(max_steps=16, **schedule)):
            save_checkpoint(ck, 16, state(16.0))
        (ck / RECORD).unlink()  # a kill between the marker and its record
        messages = []
        with claim_checkpoints(ck, key(max_steps=24, **schedule), messages.append) as claim:
            # Lengths in updates do not depend on the limit, whatever it was.
            assert claim.start == (16 if name == "updates" else 0)
        if name == "shares":
            assert len(messages) == 1
            assert "the max_steps they were made under is not recorded, and warmup_steps " \
                   "0.25 and heads_only_steps 0.1 depend on it" in messages[0]
        else:
            assert messages == []


# ----------------------------------------------------------------------------- fingerprints


def test_checkpoint_of_another_fingerprint_is_skipped_with_a_warning(tmp_path):
    save_checkpoint(tmp_path, 1, state(1.0), fingerprint="a" * 64)
    save_checkpoint(tmp_path, 2, state(2.0), fingerprint="b" * 64)
    with pytest.warns(UserWarning, match=r"step-00000002\.pt: made by another run"):
        step, loaded = load_latest(tmp_path, fingerprint="a" * 64)
    assert step == 1 and torch.equal(loaded["w"], torch.full((2,), 1.0))
    with pytest.warns(UserWarning, match="another run"):
        assert load_latest(tmp_path, fingerprint="c" * 64) is None


def test_checkpoints_carry_their_folders_fingerprint_by_default(tmp_path):
    with claim_checkpoints(tmp_path, signature()):
        save_checkpoint(tmp_path, 7, state(7.0))  # as the training loop calls it
    assert load_latest(tmp_path)[0] == 7
    # A marker of another run (files copied in by hand, say): its checkpoints are not resumed.
    (tmp_path / MARKER).write_text(f"bestrq-checkpoints/2\n{'d' * 64}\n")
    with pytest.warns(UserWarning, match=r"step-00000007\.pt"):
        assert load_latest(tmp_path) is None


# ----------------------------------------------------------------------------- one writer

SECOND_WRITER = """
import sys
from pathlib import Path
from bestrq.checkpoint import CheckpointFolderError, claim_checkpoints, run_signature
try:
    claim_checkpoints(Path(sys.argv[1]), run_signature({"max_steps": 30}, {"f": b"x"}))
except CheckpointFolderError as err:
    print(err)
    sys.exit(3)
"""


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          timeout=120)


def test_second_writer_is_refused_at_once_and_the_first_is_unaffected(tmp_path):
    sig = run_signature({"max_steps": 30}, {"f": b"x"})
    with claim_checkpoints(tmp_path, sig) as first:
        save_checkpoint(tmp_path, 1, state(1.0))
        in_flight = tmp_path / ".tmp-step-inflight"  # the first writer's half-written file
        in_flight.write_bytes(b"half")
        proc = run_python(SECOND_WRITER, str(tmp_path))
        assert proc.returncode == 3
        assert str(tmp_path) in proc.stdout and "in use by another run" in proc.stdout
        assert f"pid {os.getpid()}" in proc.stdout
        # The second writer deleted, moved and re-marked nothing.
        assert in_flight.read_bytes() == b"half"
        assert folder_fingerprint(tmp_path) == sig.fingerprint
        in_flight.unlink()
        save_checkpoint(tmp_path, 2, state(2.0))  # the first goes on
        assert load_latest(tmp_path)[0] == 2
        # A second claim from this very process is refused too (flock is per open file).
        with pytest.raises(CheckpointFolderError, match="in use"):
            claim_checkpoints(tmp_path, sig)
        assert first.start == 0
    proc = run_python(SECOND_WRITER, str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # free once the first has ended


KILLED_WRITER = """
import sys, torch
from pathlib import Path
from bestrq.checkpoint import claim_checkpoints, run_signature, save_checkpoint
folder = Path(sys.argv[1])
claim = claim_checkpoints(folder, run_signature({"max_steps": 30}, {"f": b"x"}))
for step in range(claim.start + 1, claim.start + 3):
    save_checkpoint(folder, step, {"w": torch.full((2,), float(step))})
"""


def test_a_killed_writer_leaves_the_folder_free_and_resumable(tmp_path):
    proc = run_python(KILLED_WRITER, str(tmp_path), env={KILL_ENV: "2:written"})
    assert proc.returncode == -9
    with claim_checkpoints(tmp_path, run_signature({"max_steps": 30}, {"f": b"x"})) as claim:
        assert claim.start == 1  # the lock died with the process; step 2 never landed


# ----------------------------------------------------------------------------- the train CLI


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Features of a few clips and a small random Whisper checkpoint."""
    from test_features import write_segments

    from bestrq.features import FeatureConfig, compute_features
    from bestrq.whisper_model import TINY_TEST_DIMS, random_whisper, save_whisper_checkpoint

    root = tmp_path_factory.mktemp("project")
    write_segments(root / "segments", {"train": [2.0, 2.5, 3.0, 2.0], "test": [2.0]})
    compute_features(root / "segments", root / "features", 80, FeatureConfig(device="cpu"))
    save_whisper_checkpoint(random_whisper(TINY_TEST_DIMS), root / "whisper.pt")
    return root


def train_cli(project: Path, out: Path, *options: str):
    from typer.testing import CliRunner

    from stages.train import build_command

    args = ["--model", str(project / "whisper.pt"), "--features_dir",
            str(project / "features"), "--output_dir", str(out), "--codebook_size", "64",
            "--batch_size", "2", "--warmup_steps", "1", "--checkpoint_every", "1",
            "--num_workers", "0", "--device", "cpu", "--max_steps", "2", *options]
    return CliRunner().invoke(build_command(REPO / "params.yaml"), args)


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter.safetensors"))


def test_train_extends_a_run_names_changes_and_refuses_other_folders(project, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)  # dvclive/ goes to the working folder
    out = tmp_path / "run"
    ck = out / "checkpoints"
    result = train_cli(project, out)
    assert result.exit_code == 0, result.output
    assert [s for s, _ in list_checkpoints(ck)] == [1, 2]

    # Raising max_steps (inverse_sqrt) keeps the run: 2 more updates, not 4 from scratch...
    result = train_cli(project, out, "--max_steps", "4")
    assert result.exit_code == 0, result.output
    assert "max_steps: 2 -> 4" in result.output
    assert "resuming from the checkpoint of step 2" in result.output
    assert json.loads((out / "adapter.json").read_text())["step"] == 4
    # ...and ends where a run of 4 updates from scratch does.
    fresh = tmp_path / "fresh"
    assert train_cli(project, fresh, "--max_steps", "4").exit_code == 0
    extended, scratch = adapter_tensors(out), adapter_tensors(fresh)
    assert extended.keys() == scratch.keys()
    assert all(torch.equal(extended[k], scratch[k]) for k in scratch)

    # Another codebook size is another run: the old checkpoints are moved aside, loudly.
    result = train_cli(project, out, "--max_steps", "4", "--codebook_size", "32")
    assert result.exit_code == 0, result.output
    assert "codebook_size: 64 -> 32" in result.output
    assert [s for s, _ in list_checkpoints(out / "checkpoints.stale")] == [3, 4]
    assert "resuming" not in result.output

    # A folder of someone else's: nothing deleted, nothing trained.
    other = tmp_path / "home"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "notes.txt").write_text("mine")
    result = train_cli(project, other)
    assert result.exit_code == 1
    assert f"checkpoint folder {other / 'checkpoints'}" in result.output
    assert (other / "checkpoints" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == ["notes.txt"]
    assert not (other / "adapter.safetensors").exists()

    # A folder another run is writing: refused, and that run's files are untouched.
    before = {p.name: p.read_bytes() for p in ck.iterdir() if p.name != LOCK}
    key = json.loads((ck / RECORD).read_text())
    with hold_lock(ck):
        result = train_cli(project, out, "--max_steps", "4", "--codebook_size", "32")
    assert result.exit_code == 1
    assert f"checkpoint folder {ck} is in use by another run" in result.output
    assert {p.name: p.read_bytes() for p in ck.iterdir() if p.name != LOCK} == before
    assert json.loads((ck / RECORD).read_text()) == key


@contextmanager
def hold_lock(directory: Path):
    """The folder's lock, held as another process's run holds it."""
    with open(directory / LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


@pytest.mark.parametrize("has_bf16", [False, True])
def test_precision_auto_is_keyed_by_what_it_resolves_to(tmp_path, monkeypatch, has_bf16):
    # `auto` is fp32 on one CPU and bf16 on another: a checkpoint made in one must not be
    # resumed in the other (it was, before the resolved precision entered the key).
    from bestrq.params import load_params
    from bestrq.run_identity import finetune_values, resolved_autocast

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    p = load_params(REPO / "params.yaml", {"device": "cpu"})
    assert p.raw["precision"] == "auto"
    assert resolved_autocast(p) == ("bf16" if has_bf16 else "fp32")
    assert finetune_values(p, "stock", 0)["autocast"] == resolved_autocast(p)
    forced = load_params(REPO / "params.yaml", {"device": "cpu", "precision": "fp32"})
    assert resolved_autocast(forced) == "fp32"
