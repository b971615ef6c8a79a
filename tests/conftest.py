"""Suite-wide fixtures: one local stack (SeaweedFS S3 + MLflow servers) per test session.

The stack runs on free ports in a temporary state dir, so test sessions never collide with a
developer's `darkmatter stack up` (ports 9000/5000) or with each other.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# `from tests.helpers import ...` works however pytest was started.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from darkmatter.quickstart import stack as stack_mod  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

# Property-based tests (hypothesis): "ci" (the default) keeps make test fast; "soak" runs many
# more examples: DARKMATTER_HYPOTHESIS_PROFILE=soak pytest tests/test_fuzz_parsers.py.
# No deadline: this machine's load, not the code, decides how long one example takes.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=40, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
settings.register_profile(
    "soak", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("DARKMATTER_HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    # In-process models here are tiny: on a 2-core machine busy with the stack's servers and
    # other tests' processes, torch's second thread spins and makes them many times slower.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack_mod.StackInfo]:
    """The running local stack (StackInfo); os.environ points at it for the whole session."""
    # Generous timeout: other test processes may be loading the machine during startup.
    with stack_mod.private(tmp_path_factory.mktemp("stack"), timeout=180) as info:
        yield info


@pytest.fixture
def bucket(stack: stack_mod.StackInfo) -> str:
    """A fresh, empty bucket on the stack's S3 server, as an ``s3://name`` URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    env = stack.env
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.s3_endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    s3.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def text_ds(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small local text dataset (synthetic sentences, 200-token vocabulary, several shards)."""
    from darkmatter.data_pipeline.prepare import prepare
    from tests.helpers import synthetic_corpus

    root = tmp_path_factory.mktemp("text")
    corpus = synthetic_corpus(root / "corpus.txt")
    prepare([str(corpus)], str(root / "ds"), modality="text", vocab_size=200, shard_bytes=100_000)
    return str(root / "ds")
