"""Retrieval / zero-shot metrics against hand-computed answers and a slow loop reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miles.metrics import chance_levels, retrieval_metrics, zeroshot_accuracy


def _check(got: dict, want: dict) -> None:
    assert set(want) <= set(got)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_perfect_diagonal():
    m = retrieval_metrics(torch.eye(5), list(range(5)))
    for d in ("t2v", "v2t"):
        _check(m[d], {"R1": 100.0, "R5": 100.0, "R10": 100.0, "MedR": 1.0, "MeanR": 1.0})
        assert all(isinstance(v, float) for v in m[d].values())


def test_known_ranks():
    sim = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],  # caption 0 -> video 0: rank 1
            [0.8, 0.5, 0.9, 0.1],  # caption 1 -> video 1: 0.8, 0.9 higher -> rank 3
            [0.1, 0.2, 0.3, 0.4],  # caption 2 -> video 2: 0.4 higher -> rank 2
            [0.85, 0.8, 0.7, 0.0],  # caption 3 -> video 3: rank 4
        ]
    )
    m = retrieval_metrics(sim, [0, 1, 2, 3])
    # t2v ranks [1, 3, 2, 4]
    _check(m["t2v"], {"R1": 25.0, "R5": 100.0, "R10": 100.0, "MedR": 2.5, "MeanR": 2.5})
    # v2t columns: video 0 -> 1, video 1 (0.5 < 0.8) -> 2, video 2 (0.3 < 0.9, 0.7) -> 3, video 3 -> 4
    _check(m["v2t"], {"R1": 25.0, "R5": 100.0, "MedR": 2.5, "MeanR": 2.5})


def test_permutation_matrix():
    perm = [2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    sim = torch.zeros(12, 12)
    sim[torch.arange(12), torch.tensor(perm)] = 1.0
    # Ground truth is the permutation itself: perfect.
    _check(retrieval_metrics(sim, perm)["t2v"], {"R1": 100.0, "MedR": 1.0})
    # Ground truth is the identity: 3 captions point elsewhere, so their video scores 0 with one
    # strictly higher (rank 2, ties among the zeros are optimistic).
    m = retrieval_metrics(sim, list(range(12)))
    _check(m["t2v"], {"R1": 75.0, "R5": 100.0, "MedR": 1.0, "MeanR": (9 + 3 * 2) / 12})
    _check(m["v2t"], {"R1": 75.0, "R5": 100.0, "MedR": 1.0, "MeanR": (9 + 3 * 2) / 12})


def test_ties_are_optimistic():
    sim = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.1],  # ties with two other videos -> rank 1
            [0.7, 0.5, 0.5, 0.1],  # one strictly higher, one tied -> rank 2
            [0.2, 0.2, 0.2, 0.2],  # all tied -> rank 1
            [0.0, 0.0, 0.3, 0.3],  # tied with video 2 -> rank 1
        ]
    )
    m = retrieval_metrics(sim, [0, 1, 2, 3])
    _check(m["t2v"], {"R1": 75.0, "MeanR": 1.25, "MedR": 1.0})
    # Constant matrix: optimistic tie-breaking gives a perfect score (a known pathology).
    _check(retrieval_metrics(torch.zeros(6, 3), [0, 0, 1, 1, 2, 2])["v2t"], {"R1": 100.0})


def test_several_captions_per_video():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # c0 -> v0: rank 1
            [0.2, 0.5, 0.6],  # c1 -> v0: rank 3
            [0.3, 0.8, 0.1],  # c2 -> v1: rank 1
            [0.7, 0.4, 0.2],  # c3 -> v1: rank 2
            [0.1, 0.2, 0.05],  # c4 -> v2: rank 3
            [0.0, 0.6, 0.3],  # c5 -> v2: rank 2
        ]
    )
    m = retrieval_metrics(sim, [0, 0, 1, 1, 2, 2])
    _check(m["t2v"], {"R1": 100 * 2 / 6, "R5": 100.0, "MedR": 2.0, "MeanR": 2.0})
    # v2t: v0 best own caption c0 (0.9) rank 1; v1 best c2 (0.8) rank 1; v2 best c5 (0.3), only c1 (0.6)
    # is higher -> rank 2 (c4 alone would rank 5).
    _check(m["v2t"], {"R1": 100 * 2 / 3, "R5": 100.0, "MedR": 1.0, "MeanR": 4 / 3})


def test_unordered_caption_assignment_and_captionless_video():
    # Captions listed out of video order; video 3 owns no caption (a t2v distractor, not a v2t query).
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.95],  # c0 -> v1: video 3 higher -> rank 2
            [0.8, 0.1, 0.2, 0.0],  # c1 -> v0: rank 1
            [0.1, 0.2, 0.7, 0.1],  # c2 -> v2: rank 1
        ]
    )
    m = retrieval_metrics(sim, [1, 0, 2])
    _check(m["t2v"], {"R1": 100 * 2 / 3, "MeanR": 4 / 3})
    _check(m["v2t"], {"R1": 100.0, "MeanR": 1.0})


def _slow_t2v(sim: np.ndarray, c2v: np.ndarray) -> list[int]:
    ranks = []
    for i in range(sim.shape[0]):
        order = sorted(sim[i].tolist(), reverse=True)
        ranks.append(order.index(sim[i, c2v[i]]) + 1)  # first occurrence: optimistic
    return ranks


def _slow_v2t(sim: np.ndarray, c2v: np.ndarray) -> list[int]:
    ranks = []
    for j in range(sim.shape[1]):
        col = sim[:, j].tolist()
        order = sorted(col, reverse=True)
        own = [order.index(col[i]) + 1 for i in range(len(col)) if c2v[i] == j]
        if own:
            ranks.append(min(own))
    return ranks


def _metrics_from_ranks(ranks: list[int]) -> dict:
    r = np.array(ranks, dtype=float)
    return {
        "R1": 100 * np.mean(r <= 1),
        "R5": 100 * np.mean(r <= 5),
        "R10": 100 * np.mean(r <= 10),
        "MedR": float(np.median(r)),
        "MeanR": float(np.mean(r)),
    }


@pytest.mark.parametrize("quantize", [False, True])
def test_random_against_slow_loop(quantize: bool):
    rng = np.random.default_rng(123)
    c2v = np.array([v for v in range(20) for _ in range(3 if v < 10 else 2)])  # 50 captions, 2-3 each
    rng.shuffle(c2v)
    sim = rng.standard_normal((50, 20))
    if quantize:  # many ties
        sim = np.round(sim, 0)
    m = retrieval_metrics(torch.from_numpy(sim), c2v.tolist())
    _check(m["t2v"], _metrics_from_ranks(_slow_t2v(sim, c2v)))
    _check(m["v2t"], _metrics_from_ranks(_slow_v2t(sim, c2v)))
    # Same answer from a numpy input and from float32.
    assert retrieval_metrics(sim, c2v) == m
    if not quantize:
        assert retrieval_metrics(torch.from_numpy(sim).float(), c2v) == m


def test_retrieval_bad_inputs():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.eye(3), [0, 1])
    with pytest.raises(ValueError):
        retrieval_metrics(torch.eye(3), [0, 1, 3])
    with pytest.raises(ValueError):
        retrieval_metrics(torch.ones(3), [0, 1, 2])


def test_zeroshot_known_answers():
    sim = torch.tensor(
        [
            [0.1, 0.2, 0.9, 0.3, 0.0, 0.4],  # label 2: nothing higher -> top1, top5
            [0.5, 0.6, 0.7, 0.8, 0.1, 0.2],  # label 0: 3 higher -> top5 only
            [0.9, 0.8, 0.7, 0.6, 0.55, 0.5],  # label 5: 5 higher -> neither
            [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # label 1: all tied -> both (optimistic)
        ]
    )
    _check(zeroshot_accuracy(sim, [2, 0, 5, 1]), {"top1": 50.0, "top5": 75.0})


def test_zeroshot_k_capped_at_num_classes():
    sim = np.array([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1]])
    # Ground truth is the worst of 3 classes: wrong at top-1, right at top-5 (capped to top-3).
    _check(zeroshot_accuracy(sim, [2, 0]), {"top1": 50.0, "top5": 100.0})


def test_chance_levels():
    c = chance_levels(1000, 5000, 101)
    assert c["R1"] == pytest.approx(0.1)
    assert c["top1"] == pytest.approx(100 / 101)
    assert chance_levels(50, 50, None) == {"R1": 2.0, "top1": None}


def test_chance_level_matches_random_scores():
    # Average R@1 of random scores over many draws approaches 100 / num_videos in both directions.
    g = torch.Generator().manual_seed(0)
    c2v = [v for v in range(10) for _ in range(3)]
    t2v, v2t = [], []
    for _ in range(400):
        m = retrieval_metrics(torch.rand(30, 10, generator=g), c2v)
        t2v.append(m["t2v"]["R1"])
        v2t.append(m["v2t"]["R1"])
    want = chance_levels(10, 30, None)["R1"]
    assert np.mean(t2v) == pytest.approx(want, abs=1.5)
    assert np.mean(v2t) == pytest.approx(want, abs=1.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_refused_not_ranked(bad: float) -> None:
    """NaN scores all tie; the optimistic rule would have ranked every query first (R@1 = 100)."""
    from miles.stop import NonFiniteError

    sim = torch.rand(4, 4)
    sim[2, 1] = bad
    with pytest.raises(NonFiniteError, match="1 of the 16 similarity scores are NaN or inf"):
        retrieval_metrics(sim, list(range(4)))
    with pytest.raises(NonFiniteError, match="refusing to report metrics"):
        zeroshot_accuracy(torch.full((3, 5), float("nan")), [0, 1, 2])


def _released_rule(sim: np.ndarray, caption_to_video: list[int]) -> dict:
    """The released evaluation written from its definition, one query at a time (0-based positions in
    the sorted candidates: t2v takes the first tied position, v2t the mean of the tied positions of each
    own caption and the best of those; R@1 counts position 0, R@K positions below K)."""

    def metrics(pos: list[float]) -> dict:
        p = np.array(pos)
        return {
            "R1": 100 * np.mean(p == 0),
            "R5": 100 * np.mean(p < 5),
            "R10": 100 * np.mean(p < 10),
            "MedR": np.median(p) + 1,
            "MeanR": np.mean(p) + 1,
        }

    t2v = []
    for i, v in enumerate(caption_to_video):
        order = np.sort(-sim[i])
        t2v.append(float(np.where(order == -sim[i, v])[0][0]))
    v2t = []
    for v in sorted(set(caption_to_video)):
        order = np.sort(-sim[:, v])
        own = [j for j, w in enumerate(caption_to_video) if w == v]
        v2t.append(min(float(np.where(order == -sim[j, v])[0].mean()) for j in own))
    return {"t2v": metrics(t2v), "v2t": metrics(v2t)}


def test_released_tie_rules_on_a_constant_matrix() -> None:
    """All scores tied: optimistic t2v ranks every caption first; averaged v2t puts every video in the
    middle of its 3 tied captions (position 1, rank 2)."""
    m = retrieval_metrics(torch.zeros(3, 3), [0, 1, 2], v2t_ties="average")
    _check(m["t2v"], {"R1": 100.0, "MedR": 1.0})
    _check(m["v2t"], {"R1": 0.0, "R5": 100.0, "MedR": 2.0, "MeanR": 2.0})
    ours = retrieval_metrics(torch.zeros(3, 3), [0, 1, 2])
    _check(ours["v2t"], {"R1": 100.0, "MedR": 1.0})


def test_fractional_ranks_count_as_the_released_code_counts_them() -> None:
    """Video 0 ties with 10 other captions at the top: position 5 on average (rank 6), so it is outside
    R@5 but inside R@10; a tie at positions 0-1 (rank 1.5) is outside R@1."""
    sim = np.zeros((12, 12))
    sim[:, 0] = 1.0  # every caption ties for video 0
    sim[:, 0][11] = -1.0  # but one
    for v in range(1, 12):
        sim[v, v] = 2.0
    m = retrieval_metrics(sim, list(range(12)), v2t_ties="average")
    assert m["v2t"] == pytest.approx(_released_rule(sim, list(range(12)))["v2t"])
    assert m["v2t"]["R5"] == pytest.approx(100 * 11 / 12) and m["v2t"]["R10"] == 100.0
    pair = np.array([[1.0, 0.0], [1.0, 1.0]])  # video 0: captions 0 and 1 tie -> rank 1.5
    got = retrieval_metrics(pair, [0, 1], v2t_ties="average")["v2t"]
    assert got["R1"] == 50.0 and got == pytest.approx(_released_rule(pair, [0, 1])["v2t"])


@pytest.mark.parametrize("seed", range(5))
def test_released_protocol_equals_its_definition_on_random_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    owner = sorted(rng.integers(0, 7, size=20).tolist())
    owner = [sorted(set(owner)).index(v) for v in owner]  # every video owns a caption
    sim = rng.integers(0, 3, size=(20, max(owner) + 1)).astype(np.float64)  # many exact ties
    got = retrieval_metrics(sim, owner, v2t_ties="average")
    want = _released_rule(sim, owner)
    for side in ("t2v", "v2t"):
        assert got[side] == pytest.approx(want[side]), side


def test_dual_softmax_demotes_a_video_that_prefers_another_query() -> None:
    """Caption 0 scores video 1 above its own video 0, but video 1 prefers caption 1 by far: the prior
    over the query set (captions) removes that pull, and caption 0 finds its video first."""
    from miles.evaluate import dual_softmax

    sim = torch.tensor([[0.5, 0.8], [0.2, 0.9]])
    assert retrieval_metrics(sim, [0, 1])["t2v"]["R1"] == 50.0
    rescored = dual_softmax(sim, 100.0, over=0)
    assert rescored[0, 1] == pytest.approx(0.8 * torch.softmax(torch.tensor([80.0, 90.0]), 0)[0].item())
    assert retrieval_metrics(rescored, [0, 1])["t2v"]["R1"] == 100.0
