"""`LSMSv2_benchmark`: LSMS against vanilla nnU-Net on the same splits and budget, accuracy and cost in one table."""
