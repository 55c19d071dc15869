"""Schemathesis against the sidecar's own OpenAPI document: no 5xx and every answer matching
its schema, for generated valid and invalid requests.

Excluded on purpose: `positive_data_acceptance`. JSON Schema counts 5.0 as an integer while the
contract refuses it, and `min_tokens <= tokens` is a rule between fields no schema states; the
refusals are tested in test_bad_input.py instead."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import start_sidecar

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_sidecar_survives_schemathesis(
    base_env: dict[str, str], logs_dir: Path, tmp_path: Path
) -> None:
    process, url = start_sidecar(
        base_env,
        logs_dir,
        SIDECAR_TOKEN="fuzz-token",
        ADMIN_TOKEN="fuzz-token",
        SIDECAR_JOURNAL_DIR=str(tmp_path / "journal"),
    )
    try:
        run = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--phases",
                "examples,fuzzing,stateful",
                "--max-examples",
                "60",
                "--workers",
                "1",
                "-H",
                "Authorization: Bearer fuzz-token",
                "--generation-deterministic",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
    finally:
        process.stop()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "generated" in run.stdout, run.stdout[-2000:]
