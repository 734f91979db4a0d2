"""lmms-eval task configs for ConvLLaVA's local question sets (pass this folder as `--include_path`)."""
