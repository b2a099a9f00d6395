"""Using the features: export (also int8), VISSL import/export, embeddings, curation, the Python API, report, plan, doctor."""
