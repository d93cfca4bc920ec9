"""Recall@K checked against a brute-force reference written plainly (full sort per query)."""

import random

import pytest
import torch

from nlmm.eval.recall import best_positive_rank, recall_at_k, retrieval_metrics


def reference_recall(q, g, q_own, g_own, k):
    hits = 0
    for i in range(len(q)):
        scores = [(float(q[i] @ g[j]), j) for j in range(len(g))]
        scores.sort(key=lambda s: -s[0])
        top = [j for _, j in scores[:k]]
        hits += any(int(g_own[j]) == int(q_own[i]) for j in top)
    return 100.0 * hits / len(q)


def test_metrics_match_brute_force_with_five_captions_per_image():
    torch.manual_seed(0)
    n_img, d = 40, 16
    img = torch.nn.functional.normalize(torch.randn(n_img, d), dim=1)
    owner_txt = torch.arange(n_img).repeat_interleave(5)
    # captions lie near their image so recall is neither 0 nor 100
    txt = torch.nn.functional.normalize(img[owner_txt] + 1.2 * torch.randn(len(owner_txt), d), dim=1)
    keep = torch.rand(len(owner_txt)) > 0.2  # some captions have no spoken version
    owner_aud = owner_txt[keep]
    aud = torch.nn.functional.normalize(img[owner_aud] + 1.5 * torch.randn(len(owner_aud), d), dim=1)
    emb = {"image": img, "text": txt, "audio": aud}
    own = {"image": torch.arange(n_img), "text": owner_txt, "audio": owner_aud}

    got = retrieval_metrics(emb, own)
    pairs = {"i": "image", "t": "text", "a": "audio"}
    for direction in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t"):
        qm, gm = pairs[direction[0]], pairs[direction[2]]
        for k in (1, 5, 10):
            want = reference_recall(emb[qm], emb[gm], own[qm], own[gm], k)
            assert abs(got[f"{direction}_r{k}"] - want) < 1e-9, (direction, k)
    assert 0 < got["i2t_r1"] < 100
    r1 = [got[f"{d}_r1"] for d in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")]
    assert abs(got["mean_r1"] - sum(r1) / 6) < 1e-9


def test_any_caption_counts_for_image_to_text():
    # image 0's first caption is far away, its third is the nearest: i2t R@1 must be a hit
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.1, 0.99]])
    got = retrieval_metrics({"image": img, "text": txt},
                            {"image": torch.tensor([0, 1]), "text": torch.tensor([0, 1, 0, 1])})
    assert got["i2t_r1"] == 100.0
    assert got["t2i_r1"] == 75.0  # caption 0 points away from its image


def test_missing_modality_gives_only_available_directions():
    e = torch.eye(3)
    got = retrieval_metrics({"image": e, "text": e}, {"image": torch.arange(3), "text": torch.arange(3)})
    assert set(got) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_r1"}
    assert got["mean_r1"] == 100.0


# ---------------------------------------------------------------- ties and non-finite scores

def pessimistic_reference_recall(q: torch.Tensor, g: torch.Tensor, q_own: torch.Tensor,
                                 g_own: torch.Tensor, k: int) -> float:
    """Full sort per query where a negative tying with a positive sorts before it."""
    hits = covered = 0
    for i in range(len(q)):
        positive = [int(g_own[j]) == int(q_own[i]) for j in range(len(g))]
        if not any(positive):
            continue
        covered += 1
        order = sorted(range(len(g)), key=lambda j: (-float(q[i] @ g[j]), positive[j]))
        hits += any(positive[j] for j in order[:k])
    return 100.0 * hits / covered


def random_tie_recall(q: torch.Tensor, g: torch.Tensor, q_own: torch.Tensor, g_own: torch.Tensor,
                      k: int, draws: int, rng: random.Random) -> float:
    """Recall with ties broken at random, averaged over `draws` shuffles."""
    total = 0.0
    for _ in range(draws):
        hits = 0
        for i in range(len(q)):
            keys = [(-float(q[i] @ g[j]), float(rng.random()), j) for j in range(len(g))]
            top = [j for _, _, j in sorted(keys)[:k]]
            hits += any(int(g_own[j]) == int(q_own[i]) for j in top)
        total += 100.0 * hits / len(q)
    return total / draws


def test_ties_count_against_the_query_like_a_pessimistic_full_sort():
    gen = torch.Generator().manual_seed(1)
    n_img = 12
    # small integer entries make exact dot-product ties between many items
    img = torch.randint(-1, 2, (n_img, 3), generator=gen).float()
    owner_txt = torch.arange(n_img).repeat_interleave(3)
    txt = torch.randint(-1, 2, (len(owner_txt), 3), generator=gen).float()
    emb, own = {"image": img, "text": txt}, {"image": torch.arange(n_img), "text": owner_txt}
    got = retrieval_metrics(emb, own)
    rng = random.Random(0)
    for direction, (qm, gm) in {"i2t": ("image", "text"), "t2i": ("text", "image")}.items():
        for k in (1, 5, 10):
            want = pessimistic_reference_recall(emb[qm], emb[gm], own[qm], own[gm], k)
            assert abs(got[f"{direction}_r{k}"] - want) < 1e-9, (direction, k)
            # ties are frequent here, so the pessimistic figure is a bound on a fair tie-break
            fair = random_tie_recall(emb[qm], emb[gm], own[qm], own[gm], k, 20, rng)
            assert got[f"{direction}_r{k}"] <= fair + 1e-9, (direction, k)
    assert got["t2i_r1"] < random_tie_recall(txt, img, owner_txt, torch.arange(n_img), 1, 20, rng)


def test_nan_embeddings_score_zero_everywhere():
    n_img = 10  # every gallery holds at least K = 10 items, so rank = gallery size is a miss
    nan = torch.full((n_img, 8), float("nan"))
    owner_txt = torch.arange(n_img).repeat_interleave(5)
    got = retrieval_metrics({"image": nan, "text": torch.full((len(owner_txt), 8), float("nan")),
                             "audio": torch.full((len(owner_txt), 8), float("nan"))},
                            {"image": torch.arange(n_img), "text": owner_txt, "audio": owner_txt})
    assert len(got) == 19 and all(v == 0.0 for v in got.values()), got


def test_one_non_finite_score_makes_that_query_miss():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [float("inf"), 0.0]])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # query 1 meets inf * 0 = nan in its row although its own positive scores best
    ranks = best_positive_rank(query, gallery, torch.tensor([0, 1]), torch.tensor([0, 1, 2]))
    assert ranks.tolist() == [3, 3]


def test_collapsed_embeddings_score_no_better_than_chance():
    n_img = 10
    owner_txt = torch.arange(n_img).repeat_interleave(5)
    same = torch.nn.functional.normalize(torch.ones(1, 16), dim=1)
    got = retrieval_metrics({"image": same.expand(n_img, 16),
                             "text": same.expand(len(owner_txt), 16)},
                            {"image": torch.arange(n_img), "text": owner_txt})
    chance = 100.0 / n_img  # one image in N, and five captions in 5N
    assert got["i2t_r1"] <= chance and got["t2i_r1"] <= chance and got["mean_r1"] <= chance


# ---------------------------------------------------------------- precision

def test_scores_stay_fp32_inside_a_bf16_autocast():
    # fp32 scores: positive 0.003 > negative 0.002. In bf16 1.003 rounds to 1.0, so the
    # positive's score becomes 0.0 and falls below the negative's.
    query = torch.tensor([[1.0, 1.0, 1.0]])
    gallery = torch.tensor([[1.003, -1.0, 0.0], [1.0, -1.0, 0.002]])
    q_own, g_own = torch.tensor([0]), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = query @ gallery.t()
        assert low.dtype == torch.bfloat16 and low[0, 0] < low[0, 1]  # the premise holds
        mixed = recall_at_k(query, gallery, q_own, g_own)
    assert mixed == recall_at_k(query, gallery, q_own, g_own) == {1: 100.0, 5: 100.0, 10: 100.0}


# ---------------------------------------------------------------- partial coverage, strict speech

def partly_spoken_set() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                 dict[str, torch.Tensor]]:
    """Three images; captions are rows 10-14 (two for images 0 and 1, one for image 2) and
    only rows 10-12 were read aloud, so image 2 and caption 13 have no audio."""
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    # each of the first two readings lies nearer the other caption of its image than its own
    aud = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])
    emb = {"image": img, "text": txt, "audio": aud}
    owner = {"image": torch.arange(3), "text": torch.tensor([0, 0, 1, 1, 2]),
             "audio": torch.tensor([0, 0, 1])}
    rows = {"text": torch.arange(10, 15), "audio": torch.tensor([10, 11, 12])}
    return emb, owner, rows


def test_queries_without_a_positive_leave_the_denominator():
    emb, owner, _ = partly_spoken_set()
    got = retrieval_metrics(emb, owner)
    assert got["i2a_r1"] == 100.0  # image 2 has no audio: 2 of 2, not 2 of 3
    assert got["t2a_r1"] == 75.0  # captions 10-13 scored (13 misses), caption 14 left out
    assert got["a2i_r1"] == got["a2t_r1"] == 100.0
    r1 = [got[f"{d}_r1"] for d in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")]
    assert got["mean_r1"] == sum(r1) / 6


def test_recall_at_k_needs_one_covered_query():
    e = torch.eye(2)
    with pytest.raises(ValueError, match="no query has a positive"):
        recall_at_k(e, e, torch.tensor([0, 1]), torch.tensor([2, 3]))


def test_strict_speech_figures_take_only_the_own_reading_as_positive():
    emb, owner, rows = partly_spoken_set()
    got = retrieval_metrics(emb, owner, caption_rows=rows)
    assert got["t2a_r1"] == 75.0 and got["a2t_r1"] == 100.0
    # captions 10 and 11 and readings 10 and 11 each rank the other item of the pair first
    assert abs(got["t2a_own_r1"] - 100.0 / 3) < 1e-9 and got["t2a_own_r5"] == 100.0
    assert abs(got["a2t_own_r1"] - 100.0 / 3) < 1e-9 and got["a2t_own_r5"] == 100.0
    r1 = [got[f"{d}_r1"] for d in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")]
    assert got["mean_r1"] == sum(r1) / 6  # the strict figures stay out of the mean


def clip_benchmark_recall(images: torch.Tensor, texts: torch.Tensor, texts_image_index: list[int],
                          k: int) -> tuple[float, float]:
    """LAION CLIP_benchmark's formula (clip_benchmark/metrics/zeroshot_retrieval.py), written
    out as it is there: scores = texts @ images.T, a (texts, images) positive_pairs matrix,
    recall_at_k = (positive_pairs gathered at each query's top-k indices).sum > 0; image
    retrieval from text queries, text retrieval from image queries (any caption in the top k)."""
    scores = texts @ images.t()
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), torch.tensor(texts_image_index)] = True

    def recall_at_k(scores: torch.Tensor, positive_pairs: torch.Tensor, k: int) -> torch.Tensor:
        nb_texts, nb_images = scores.shape
        topk_indices = torch.topk(scores, k, dim=1)[1]
        nb_positive = positive_pairs.sum(dim=1)
        topk_indices_onehot = torch.nn.functional.one_hot(topk_indices, num_classes=nb_images)
        positive_pairs_reshaped = positive_pairs.view(nb_texts, 1, nb_images)
        nb_true_positive = (topk_indices_onehot * positive_pairs_reshaped).sum(dim=(1, 2))
        return (nb_true_positive / nb_positive) > 0

    text_to_image = recall_at_k(scores, positive_pairs, k).float().mean().item()
    image_to_text = recall_at_k(scores.T, positive_pairs.T, k).float().mean().item()
    return 100 * image_to_text, 100 * text_to_image


@pytest.mark.parametrize("k", [1, 5, 10])
def test_recall_equals_clip_benchmark_on_embeddings_without_ties(k: int) -> None:
    g = torch.Generator().manual_seed(3)
    n_images, per_image = 40, 5
    images = torch.nn.functional.normalize(torch.randn(n_images, 16, generator=g), dim=1)
    owners = torch.arange(n_images).repeat_interleave(per_image)
    # captions near their image, noisy enough that recall is neither 0 nor 100
    texts = torch.nn.functional.normalize(images[owners] + 0.9 * torch.randn(len(owners), 16,
                                                                             generator=g), dim=1)
    ours = retrieval_metrics({"image": images, "text": texts},
                             {"image": torch.arange(n_images), "text": owners}, ks=(k,))
    i2t, t2i = clip_benchmark_recall(images, texts, owners.tolist(), k)
    assert 0 < ours[f"i2t_r{k}"] < 100 and 0 < ours[f"t2i_r{k}"] < 100
    assert ours[f"i2t_r{k}"] == pytest.approx(i2t)
    assert ours[f"t2i_r{k}"] == pytest.approx(t2i)
