"""darkmatter: distributed self-supervised pretraining.

The layers, lowest first, each importing only those below it (tests/test_layers.py holds it):

    darkmatter.storage        object storage through fsspec/s3fs: retries, atomic and
                              conditional writes (storage/)
    darkmatter.data_pipeline  prepare, manifests, the resumable elastic reader (data_pipeline/)
    darkmatter.trainer        config, objectives, the DeepSpeed engine loop, checkpoints,
                              tracking (trainer/)
    darkmatter.evaluation     the separate harness: probes, kNN, export (evaluation/)

Above them, in this folder: `darkmatter.cli` (the `darkmatter` command) and
`darkmatter.quickstart` (the local S3 + MLflow stack and the quickstart's data generators).
"""

__version__ = "0.1.0"
