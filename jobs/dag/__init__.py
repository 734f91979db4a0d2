"""The training DAG: preprocess → stage 1 → stage 2 → stage 3 → eval, recorded in MLflow (`convllava pipeline`)."""
