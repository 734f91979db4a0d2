"""MLflow: runs, parameters, datasets and metrics; logged models; the model registry and its champion gate."""
