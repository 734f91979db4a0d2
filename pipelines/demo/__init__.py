"""The seeded demo data set: shapes scenes (`scenes.py`) and real photos with captions, questions and held-out
eval sets about them (`data.py`; `convllava demo-data`)."""
