"""The model: `ConvLlavaConfig` and its presets, the ConvNeXt tower with its fifth stage, the projector and causal LM
(`model.py`), attention kernels, trainable groups, our checkpoint format and the released LLaVA layout, weight files,
and generation."""
