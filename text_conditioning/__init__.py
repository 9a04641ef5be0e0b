"""Text side of LSMS: the expressions file, frozen text encoders and their on-disk embedding cache."""
