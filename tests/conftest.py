"""Suite-wide fixtures: one local stack (moto S3 + MLflow servers) per test session.

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

from tests.helpers import free_port  # noqa: E402
from trainer import stack as stack_mod  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Variables the stack fixture overrides; the originals come back at session end.
_STACK_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "DARKMATTER_STACK_DIR",
)
# Variables that would send clients elsewhere than the test stack.
_SHADOWING_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[stack_mod.StackInfo]:
    """The running local stack (StackInfo); os.environ points at it for the whole session."""
    state_dir = tmp_path_factory.mktemp("stack")
    # Generous timeout: other test processes may be loading the machine during startup.
    info = stack_mod.up(
        s3_port=free_port(), mlflow_port=free_port(), state_dir=state_dir, timeout=180
    )
    saved = {k: os.environ.get(k) for k in (*_STACK_VARS, *_SHADOWING_VARS)}
    for key in _SHADOWING_VARS:
        os.environ.pop(key, None)
    os.environ.update(info.env)
    os.environ["DARKMATTER_STACK_DIR"] = str(state_dir)
    try:
        yield info
    finally:
        stack_mod.down(state_dir)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
