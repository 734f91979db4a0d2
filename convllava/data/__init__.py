"""Training data without a cluster: the shard format and its manifest, the preprocessing config the shards record,
the epoch plan and collate function, a rank's read-ahead loader, and the sample photos."""
