"""Fixtures of the reliability suite: an S3 endpoint that checks credentials (moto's server with
IAM authentication on), and a secret that must never show up in a message, log or file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

# Distinctive, so that a grep for it finds nothing else.
SECRET_ACCESS_KEY = "rel1abilitySecretKeyNeverLogged0000000000"


@pytest.fixture(scope="session")
def secret_access_key() -> str:
    """A secret key no message, log or file may ever contain."""
    return SECRET_ACCESS_KEY


@dataclass(frozen=True)
class AuthenticatedS3:
    """An S3 endpoint that refuses unknown keys and bad signatures, with one bucket and one user
    allowed to use it."""

    endpoint: str
    bucket: str
    access_key_id: str
    secret_access_key: str

    def env(self, *, access_key_id: str | None = None, secret_access_key: str | None = None) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": access_key_id or self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": secret_access_key or self.secret_access_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


@pytest.fixture(scope="session")
def authenticated_s3():
    """moto's server with authentication on after its first 4 requests: those create an IAM user,
    its access key, its S3 policy and the bucket; every later request must be signed with that key."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("moto S3 server (authenticated) did not start within 30 s")
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        bootstrap = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "bootstrap",
                     "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", **bootstrap)
        iam.create_user(UserName="ckd")
        key = iam.create_access_key(UserName="ckd")["AccessKey"]
        iam.put_user_policy(UserName="ckd", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        boto3.client("s3", **bootstrap).create_bucket(Bucket="ckd-authenticated")
        yield AuthenticatedS3(endpoint, "ckd-authenticated", key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def use_s3_env(monkeypatch):
    """Sets AWS_* variables for this test. boto3's default session resolves credentials once per
    process and keeps them, so it is dropped too: the next client reads the new environment."""
    import boto3

    def use(env: dict[str, str]) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)

    return use


@pytest.fixture
def wrong_credentials(authenticated_s3, use_s3_env):
    """The environment of a job whose secret key is wrong (the key id is right)."""
    use_s3_env(authenticated_s3.env(secret_access_key=SECRET_ACCESS_KEY))
    return authenticated_s3
