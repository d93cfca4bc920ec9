"""Evaluation: Recall@K (recall), evaluating a checkpoint on a corpus and a protocol
(evaluate), and forgetting across a run's lineage."""
