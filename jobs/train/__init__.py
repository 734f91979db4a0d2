"""Training stages: the stage config, the recipe (no Ray, no MLflow), its Ray Train driver and local runner,
the DeepSpeed strategy and the memory plan."""
