"""Cohorts: one support example propagated over the volumes of a CSV manifest.

* :mod:`.batch` - the manifest, resumable runs (sidecar hashes), the summary, the local runner;
* :mod:`.ray_cluster` - the same rows on a Ray cluster (``protosam batch --ray``).

``protosam batch`` is :mod:`protosam.cli.batch`.
"""
