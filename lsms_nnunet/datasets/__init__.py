"""Datasets for LSMS: the embedded synthetic referring dataset and converters from what users already have."""
