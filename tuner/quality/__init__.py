"""Semantic consistency: how similar two answers are in meaning, measured outside the inference.

- ``backends``: the similarity backends (``minilm``, ``embeddings``, ``lexical-chrf``), their checks;
- ``chrf``: chrF without dependencies (the lexical backend);
- ``scorer``: the scorer child process of the sidecar (bounded queue, one job at a time);
- ``probe``: the sidecar's ``quality`` probe (sampled responses and canary rounds -> events and values);
- ``canary``: canary prompt sets (the demo's, or a user's file).

Nothing here is imported by ``tuner.client``; torch and transformers are imported only in the scorer process.
"""
