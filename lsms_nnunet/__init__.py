"""LSMS for nnU-Net: referring lesion segmentation as an nnU-Net v2 plugin."""
