"""DBNet model, loss and post-processing."""

from .backbone import BACKBONE_CHANNELS, ResNetBackbone
from .dbnet import DBNet
from .head import DBHeadBranch
from .loss import DBLoss, balanced_bce_with_logits, dice_loss, masked_l1_loss
from .neck import DBFPN, db_weights_init
from .postprocess import DBPostProcessor

__all__ = [
    "BACKBONE_CHANNELS",
    "DBFPN",
    "DBHeadBranch",
    "DBLoss",
    "DBNet",
    "DBPostProcessor",
    "ResNetBackbone",
    "balanced_bce_with_logits",
    "db_weights_init",
    "dice_loss",
    "masked_l1_loss",
]
