"""Recall@K checked against a brute-force reference written plainly (full sort per query)."""

import torch

from nlmm.train.retrieval import retrieval_metrics


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
