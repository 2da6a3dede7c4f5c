"""The built-in demo: a small byte-level Llama-style model trained on the standard library's pydoc topics.

``tuner demo`` runs :mod:`tuner.demo.workload` (this model serving a Poisson request stream) as a child
under the sidecar, the same way ``tuner run`` runs a user's command.
"""
