"""LSMS network (SVLA encoder, Full-Scale Decoder, text-conditioned heads), settings and contrastive loss."""
from lsms_nnunet.network.config import ABLATIONS, LSMSConfig
from lsms_nnunet.network.full_scale_decoder import FullScaleDecoder
from lsms_nnunet.network.losses import VisionLanguageContrastiveLoss
from lsms_nnunet.network.lsms_net import LSMSNet, build_lsms_network
from lsms_nnunet.network.svla import (DepthwiseStripConv, ScaleAwareVisualAttention, SVLABlock,
                                      VisionLanguageAttention)
from lsms_nnunet.network.text_head import TextConditionedHead

__all__ = ["ABLATIONS", "DepthwiseStripConv", "FullScaleDecoder", "LSMSConfig", "LSMSNet", "SVLABlock",
           "ScaleAwareVisualAttention", "TextConditionedHead", "VisionLanguageAttention", "VisionLanguageContrastiveLoss",
           "build_lsms_network"]
