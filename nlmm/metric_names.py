"""Names of the metrics a run records: the trainer and the evaluation write them under these
names, and the CLI, the plots and the dashboard read them back.

Free of imports on purpose, so that `nlmm runs ls` and the dashboard can read these without
loading torch.
"""

# The six retrieval directions, query→gallery: i2t is image→text, t2i text→image, and so on.
DIRECTIONS = ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")
# The cut-offs of Recall@K, logged as `<direction>_r<K>`.
KS = (1, 5, 10)
# `loss` is the weighted total, `loss_<pair>` the contrastive loss of one modality pair and
# `loss_ttt` the auxiliary loss of test-time training (logged with ttt.enable only).
LOSS_KEYS = ("loss", "loss_i2t", "loss_i2a", "loss_t2a", "loss_ttt")
