"""Vertex AI's predict protocol: {"instances": [...]} in, {"predictions": [...]} out."""
