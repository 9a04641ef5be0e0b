"""LSMS network (SVLA encoder + Full-Scale Decoder), its settings and its contrastive loss."""
from lsms_nnunet.network.config import ABLATIONS, LSMSConfig
from lsms_nnunet.network.full_scale_decoder import FullScaleDecoder
from lsms_nnunet.network.losses import VisionLanguageContrastiveLoss
from lsms_nnunet.network.lsms_net import LSMSNet, build_lsms_network
from lsms_nnunet.network.svla import (DepthwiseStripConv, ScaleAwareVisualAttention, SVLABlock,
                                      VisionLanguageAttention)

__all__ = ["ABLATIONS", "DepthwiseStripConv", "FullScaleDecoder", "LSMSConfig", "LSMSNet", "SVLABlock",
           "ScaleAwareVisualAttention", "VisionLanguageAttention", "VisionLanguageContrastiveLoss",
           "build_lsms_network"]
