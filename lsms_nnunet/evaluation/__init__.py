"""Referring-segmentation evaluation: per-expression metrics, LSMSv2_evaluate and LSMSv2_visualize."""
