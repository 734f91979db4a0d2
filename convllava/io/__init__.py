"""Input and output: every local and `s3://` read, write, listing and upload (`storage.py`), and config files as
typed, frozen models (`config.py`)."""
