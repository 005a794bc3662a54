import pytest
import torch

from bestrq.masking import (
    MaskingConfig,
    apply_noise,
    draw_sample_mask,
    expected_mask_fraction,
    span_mask,
    target_exposure,
    target_mask,
    target_valid,
)


def test_default_span_is_400ms_40_frames():
    cfg = MaskingConfig()
    assert (cfg.mask_prob, cfg.mask_span_ms, cfg.mask_noise_std, cfg.span_frames) == \
        (0.01, 400.0, 0.1, 40)


def test_masked_fraction_matches_analytic_expectation():
    g = torch.Generator().manual_seed(0)
    num_valid = torch.full((2000,), 3000)
    mask = span_mask(num_valid, 3000, 0.01, 40, g)
    expected = expected_mask_fraction(3000, 0.01, 40)
    assert abs(expected - (1 - 0.99 ** 40)) < 0.01  # ~0.331 away from the start of a clip
    observed = mask.float().mean().item()
    # 6M frames; spans make frames correlated, so allow a few standard errors of span counts
    assert abs(observed - expected) < 0.003
    # per-position probability near the clip start follows 1 - (1-p)^(t+1)
    for t in (0, 9, 39, 1000):
        p_t = 1 - 0.99 ** min(t + 1, 40)
        assert abs(mask[:, t].float().mean().item() - p_t) < 0.02


def test_span_lengths_are_40_frames_when_isolated():
    g = torch.Generator().manual_seed(1)
    mask = span_mask(torch.full((500,), 3000), 3000, 0.001, 40, g)
    runs = []
    for row in mask:
        padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int()
        d = torch.diff(padded)
        starts, ends = torch.nonzero(d == 1)[:, 0], torch.nonzero(d == -1)[:, 0]
        runs += (ends - starts).tolist()
    runs = torch.tensor(runs)
    # at p=0.001 almost every run is one unmerged span; merges make runs longer, clipping at
    # the end shorter; all runs are multiples-of-nothing but most are exactly 40
    assert (runs == 40).float().mean() > 0.9
    assert (runs >= 40).float().mean() > 0.97


def test_overlapping_spans_merge_and_padding_never_masked():
    g = torch.Generator().manual_seed(2)
    num_valid = torch.tensor([3000, 1234, 0, 41])
    mask = span_mask(num_valid, 3000, 0.3, 40, g)
    for i, n in enumerate(num_valid.tolist()):
        assert not mask[i, n:].any()
    assert mask[0].float().mean() > 0.99  # at p=0.3 spans merge into (almost) everything
    assert not mask[2].any()


def test_target_mask_share_of_stacked_frames():
    frame_mask = torch.zeros(1, 8, dtype=torch.bool)
    frame_mask[0, 3] = True  # second frame of target 1
    frame_mask[0, 4:6] = True  # both frames of target 2
    assert target_mask(frame_mask, 2, 0.5)[0].tolist() == [False, True, True, False]
    assert target_mask(frame_mask, 2)[0].tolist() == [False, False, True, False]  # default 1.0
    assert target_mask(frame_mask, 2, 0.8)[0].tolist() == [False, False, True, False]
    four = torch.tensor([[True, True, True, False, True, True, False, False]])
    assert target_mask(four, 4, 0.75)[0].tolist() == [True, False]
    assert target_mask(four, 4, 0.5)[0].tolist() == [True, True]
    assert target_mask(four, 4, 0.1)[0].tolist() == [True, True]
    assert target_valid(torch.tensor([5]), 4, 2)[0].tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="mask_target_share"):
        MaskingConfig(mask_target_share=0.0).validate()


def test_exposure_by_hand():
    #            t0     t1     t2     t3     t4
    m = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    nv = torch.tensor([10])
    # share 0.5 predicts t0..t3; t0 sees its frame 0. Reach of t_j: frames 2j-2 .. 2j+2.
    # t0: 0..2 has 0 open; t1: 0..4 has 0; t2: 2..6 none open; t3: 4..8 has 8 open.
    e = target_exposure(m, nv, 2, 0.5)
    assert e == {"targets": 4.0, "own_frame": 0.25, "receptive_field": 0.75}
    e = target_exposure(m, nv, 2, 1.0)  # t1, t2, t3
    assert e == {"targets": 3.0, "own_frame": 0.0, "receptive_field": pytest.approx(2 / 3)}
    # frames past num_valid are padding, not an unmasked frame
    e = target_exposure(m, torch.tensor([8]), 2, 1.0)
    assert e["receptive_field"] == pytest.approx(1 / 3)


def test_default_rule_leaves_no_predicted_target_an_own_frame():
    g = torch.Generator().manual_seed(4)
    nv = torch.randint(1000, 3001, (64,), generator=g)
    mask = span_mask(nv, 3000, 0.01, 40, g)
    default = target_exposure(mask, nv, 2, MaskingConfig().mask_target_share)
    anyone = target_exposure(mask, nv, 2, 0.5)
    assert default["targets"] > 10_000 and default["own_frame"] == 0.0
    # any-frame rule: a span of 40 frames starts on an odd frame half the time, and each
    # such span's first and last targets see one of their own frames
    assert 0.02 < anyone["own_frame"] < 0.06
    assert default["receptive_field"] < anyone["receptive_field"]


def test_noise_replaces_only_masked_frames_with_n0_01():
    cfg = MaskingConfig()
    mask, noise = draw_sample_mask(3000, 3000, 80, cfg, seed=3)
    z = torch.full((1, 80, 3000), 5.0)
    out = apply_noise(z, mask[None], noise[None])
    assert torch.equal(out[0][:, ~mask], z[0][:, ~mask])
    assert torch.equal(out[0][:, mask], noise[:, mask])
    assert abs(noise.std().item() - 0.1) < 0.002 and abs(noise.mean().item()) < 0.001


def test_sample_mask_deterministic_per_seed():
    cfg = MaskingConfig(mask_prob=0.05)
    a, b, c = (draw_sample_mask(2000, 3000, 80, cfg, s) for s in (11, 11, 12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not a[0][2000:].any()


@pytest.mark.parametrize(("kw", "name"), [({"mask_prob": 0}, "mask_prob"),
                                          ({"mask_span_ms": 1}, "mask_span_ms"),
                                          ({"mask_noise_std": -1}, "mask_noise_std"),
                                          ({"mask_target_share": 1.5}, "mask_target_share")])
def test_bad_config_names_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        MaskingConfig(**kw).validate()
