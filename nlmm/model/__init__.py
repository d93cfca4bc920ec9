"""NL-MM: tri-modal Nested-Learning encoders for image / text / speech retrieval."""

from nlmm.model.losses import ContrastiveLoss, ForwardOutput, contrastive_loss
from nlmm.model.nlmm import NLMM, NLMMState
from nlmm.model.ttt import MASK_TOKEN_ID, AdaptationResult, adapt_and_encode

__all__ = ["NLMM", "NLMMState", "ContrastiveLoss", "ForwardOutput", "contrastive_loss",
           "MASK_TOKEN_ID", "AdaptationResult", "adapt_and_encode"]
