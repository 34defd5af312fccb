"""Grading archives on a Ray cluster (the ``[cluster]`` extra): resumable, exactly-once Parquet output.

``inputs`` lists what to grade (files, folders, manifest CSVs, ``s3://`` URIs); ``records`` lays a
:class:`~retinagrade.report.ResultRecord` out as a Parquet row (and holds the writer registry's ``parquet``
format); ``shards`` keeps the output folder (atomic shards, resume, merge, summary); ``engine`` is the Ray
Data pipeline. Only ``engine`` imports Ray, so the rest is usable and testable without it.
"""

#: What to say when Ray (or pyarrow) is missing: here, so that the front door can say it without them.
RAY_MISSING = "the ray engine needs the [cluster] extra: pip install 'retinagrade[cluster]'"
