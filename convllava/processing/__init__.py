"""From conversations and images to model inputs: templates, tokenizers, labels, resolution buckets, image
processing and `ConvLlavaProcessor` with its processor_config.json."""
