"""The local stack (S3 + MLflow servers on 127.0.0.1) and the quickstart: its corpora and data
generators and the end-to-end run of `make quickstart`. Nothing in the library layers imports
this package; it sits on top of them, beside the CLI."""
