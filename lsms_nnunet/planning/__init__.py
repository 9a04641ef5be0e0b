"""LSMS-aware experiment planning on top of nnU-Net's planners (the 'planning' stage; its presets live in plans/).

- `presets`: nnU-Net's GPU memory references and the M/L/XL presets (data in plans/presets.json).
- `lsms_block`: the 'lsms' block of a configuration: written by the planners, read by the trainer.
- `planners`: the planner classes (shaped like nnU-Net's residual_encoder_unet_planners.py).
- `data_sharing`: LSMS configurations reuse nnUNetPlans' preprocessed data when it would be identical.
- `plan_experiment`: plan + preprocess a dataset; `LSMSv2_plan_experiment`.
- `variants`: derived plans (capped features, other batch size); `LSMSv2_plans_variant`.
- `memory_profile`: the CPU profiler that calibrated the planners' memory estimate (not imported at run time).
"""
