import math

import pytest
import torch

from bestrq.quantizer import QuantizerConfig, RandomProjectionQuantizer, stack_frames


def make(**kw) -> RandomProjectionQuantizer:
    return RandomProjectionQuantizer(QuantizerConfig(**{"codebook_size": 512, **kw}))


def test_stack_frames_layout():
    x = torch.arange(2 * 3 * 6, dtype=torch.float32).reshape(2, 3, 6)  # (batch, mels, frames)
    s = stack_frames(x, 2)
    assert s.shape == (2, 3, 6)
    # target 1 of clip 0 holds frames 2 and 3 of every mel bin, frame-major
    assert s[0, 1].tolist() == [2.0, 8.0, 14.0, 3.0, 9.0, 15.0]


def test_shapes_and_frozen_state():
    q = make(num_codebooks=3)
    assert q.projection.shape == (3, 160, 16)
    assert q.codebooks.shape == (3, 512, 16)
    assert torch.allclose(q.codebooks.norm(dim=-1), torch.ones(3, 512), atol=1e-6)
    assert list(q.parameters()) == []  # nothing trainable
    labels = q(torch.randn(2, 80, 3000))
    assert labels.shape == (2, 3, 1500) and labels.dtype == torch.long
    assert labels.min() >= 0 and labels.max() < 512


def test_xavier_normal_projection_scale():
    q = make(num_codebooks=4)
    expected = math.sqrt(2.0 / (160 + 16))
    assert abs(q.projection.std().item() - expected) / expected < 0.05
    assert abs(q.projection.mean().item()) < 0.01


def test_same_seed_same_labels_and_codebooks_differ():
    x = torch.randn(2, 80, 300)
    a, b = make(num_codebooks=2, seed=7), make(num_codebooks=2, seed=7)
    assert torch.equal(a.projection, b.projection) and torch.equal(a.codebooks, b.codebooks)
    assert torch.equal(a(x), b(x))
    # global RNG state must not matter
    torch.manual_seed(123)
    assert torch.equal(make(num_codebooks=2, seed=7).codebooks, a.codebooks)
    assert not torch.equal(a.codebooks[0], a.codebooks[1])
    assert not torch.equal(a.projection[0], a.projection[1])
    la = a(x)
    assert (la[:, 0] != la[:, 1]).float().mean() > 0.5  # independent codebooks disagree
    assert not torch.equal(make(seed=8).codebooks, make(seed=7).codebooks)


def test_labels_equal_brute_force_nearest_neighbour():
    q = make(num_codebooks=2, codebook_size=300)
    x = torch.randn(3, 80, 400)
    labels = q(x, max_elements=1000)  # tiny chunks exercise the chunked path
    stacked = stack_frames(x, 2).reshape(-1, 160)
    for n in range(2):
        proj = stacked @ q.projection[n]
        proj = proj / proj.norm(dim=-1, keepdim=True)
        dist = torch.cdist(proj, q.codebooks[n])  # L2 between unit vectors ~ cosine
        brute = dist.argmin(dim=-1).reshape(3, 200)
        assert torch.equal(labels[:, n], brute)


def test_unchanged_by_optimiser_steps_and_no_grad():
    q = make()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(1, 80, 100, requires_grad=True)
    labels = q(x)
    assert not labels.requires_grad
    head = torch.nn.Linear(1, 1)
    opt = torch.optim.AdamW(list(q.parameters()) + list(head.parameters()), lr=1.0)
    for _ in range(3):
        head(torch.ones(1, 1)).sum().backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_normalisation_round_trip_and_bad_stats():
    mean, std = torch.randn(80), torch.rand(80) + 0.5
    q = RandomProjectionQuantizer(QuantizerConfig(codebook_size=8), mean, std)
    mel = torch.randn(2, 80, 10)
    z = q.normalize(mel)
    assert torch.allclose(z[:, 3], (mel[:, 3] - mean[3]) / std[3])
    assert torch.allclose(q.denormalize(z), mel, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        RandomProjectionQuantizer(QuantizerConfig(codebook_size=8), torch.zeros(40), torch.ones(40))


@pytest.mark.parametrize("field", ["num_codebooks", "codebook_size", "code_dim", "stack_frames"])
def test_bad_config_names_the_parameter(field):
    with pytest.raises(ValueError, match=field):
        QuantizerConfig(**{field: 0}).validate()


def _speech_mels(gains_db=(0.0, 3.0, 6.0, 12.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper log-mels (len(gains), 80, 3000) of one espeak sentence at each uniform gain
    (float audio, nothing clips) and its valid frames (len(gains),)."""
    import torchaudio
    from whisper.audio import N_SAMPLES, SAMPLE_RATE

    from bestrq.features import log_mel_batch, num_valid_frames
    from bestrq.synth import EspeakSynthesizer

    audio, sr = EspeakSynthesizer().synthesize(
        "The quiet river carries seven small boats past the old mill every morning.")
    wav = torchaudio.functional.resample(torch.from_numpy(audio), sr, SAMPLE_RATE)
    frames = num_valid_frames(wav.shape[0])
    wav = torch.nn.functional.pad(wav, (0, N_SAMPLES - wav.shape[0]))
    batch = torch.stack([wav * 10 ** (db / 20) for db in gains_db])
    return log_mel_batch(batch, 80), torch.full((len(gains_db),), frames)


def test_utterance_labels_do_not_follow_the_recording_level():
    mel, nv = _speech_mels()
    valid = torch.arange(1500)[None] < (nv // 2)[:, None]  # (4, 1500)
    # global statistics of the clip at 0 dB, as the features stage would compute them
    z = mel[0][:, : nv[0]]
    stats = (z.mean(-1), z.std(-1))
    for norm, floor in (("utterance", 0.99), ("global", None)):
        q = RandomProjectionQuantizer(QuantizerConfig(quantizer_norm=norm, seed=3), *stats)
        labels = q(q.label_input(mel, nv))[:, 0]  # (4, 1500)
        same = [(labels[i] == labels[0])[valid[i]].float().mean().item() for i in (1, 2, 3)]
        if floor is not None:
            assert min(same) >= floor
        else:  # global statistics keep the level: most labels move at +12 dB
            assert same[2] < 0.5 and same[0] > same[2]


def test_utterance_statistics_ignore_padding():
    from bestrq.quantizer import utterance_normalize

    g = torch.Generator().manual_seed(0)
    mel = torch.randn(2, 4, 10, generator=g) * 3 + 5
    nv = torch.tensor([10, 6])
    z = utterance_normalize(mel, nv)
    for i, n in enumerate(nv.tolist()):
        part = mel[i, :, :n]
        ref = (part - part.mean(-1, keepdim=True)) / part.std(-1, unbiased=False, keepdim=True)
        assert torch.allclose(z[i, :, :n], ref, atol=1e-5)
    # padding changes nothing of the valid frames' values
    mel2 = mel.clone()
    mel2[1, :, 6:] = -100.0
    assert torch.equal(utterance_normalize(mel2, nv)[1, :, :6], z[1, :, :6])
    assert torch.equal(utterance_normalize(mel, torch.tensor([0, 6]))[0], mel[0])


def test_labels_where_equal_the_full_labels_there():
    q = make(num_codebooks=3)
    x = torch.randn(2, 80, 400)
    full = q(x)  # (2, 3, 200)
    where = torch.rand(2, 200, generator=torch.Generator().manual_seed(1)) < 0.3
    part = q(x, where=where, max_elements=3 * 512 * 7)  # several chunks
    picked = where[:, None, :].expand_as(full)
    assert torch.equal(part[picked], full[picked]) and (part[~picked] == -1).all()


def test_config_from_an_older_adapter_keeps_global_statistics():
    saved = QuantizerConfig(codebook_size=16).to_dict()
    del saved["norm"]
    assert QuantizerConfig.from_dict(saved).quantizer_norm == "global"
    assert QuantizerConfig().quantizer_norm == "utterance"
    with pytest.raises(ValueError, match="quantizer_norm"):
        QuantizerConfig(quantizer_norm="batch").validate()
