"""What storage may hand us is read as safetensors, Arrow and JSON only; remote code stays off
unless the config turns it on; nothing the project starts turns Ray's token authentication off."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckd_ray.models.builder import build_preset, load_model, load_spec
from ckd_ray.models.config import ModelSpec
from ckd_ray.train.checkpoint import OPTIMIZER_FILE, STATE_FILE, CorruptCheckpointError, TrainState, read_state, write_checksums

REPO = Path(__file__).resolve().parents[2]


class _Planted:
    """Unpickling this creates `path`: proof that a planted pickle was read."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _plant_pickle(path: Path, witness: Path) -> None:
    path.write_bytes(pickle.dumps(_Planted(witness)))


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("student")
    build_preset("tiny-student", seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


def test_a_model_folder_with_only_a_pickle_is_refused(student_folder, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((student_folder / "config.json").read_text())
    witness = tmp_path / "unpickled"
    _plant_pickle(folder / "pytorch_model.bin", witness)
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights \(pickled \.bin checkpoints are not loaded\)"):
        load_model(str(folder))
    assert not witness.exists()


def test_a_pickle_planted_beside_safetensors_is_never_unpickled(student_folder, tmp_path):
    witness = tmp_path / "unpickled"
    _plant_pickle(student_folder / "pytorch_model.bin", witness)
    try:
        model = load_model(str(student_folder))
    finally:
        (student_folder / "pytorch_model.bin").unlink()
    assert not witness.exists()
    expected = load_file(student_folder / "model.safetensors")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items() if name in loaded)


@pytest.mark.parametrize("planted", ["optimizer.pt", "model/pytorch_model.bin", "rng_state.pth"])
def test_a_pickle_in_a_checkpoint_folder_is_refused_with_why(tmp_path, planted):
    directory = tmp_path / "step-0000002"
    (directory / "model").mkdir(parents=True)
    (directory / STATE_FILE).write_text(TrainState(step=2).to_json())
    (directory / OPTIMIZER_FILE).write_bytes(b"")
    write_checksums(directory)
    witness = tmp_path / "unpickled"
    _plant_pickle(directory / planted, witness)
    with pytest.raises(CorruptCheckpointError, match=re.escape(planted) + r".*read as safetensors and JSON only"):
        read_state(directory)
    assert not witness.exists()


@pytest.mark.parametrize("config_value, expected", [(None, False), (True, True)])
def test_trust_remote_code_reaches_from_pretrained_only_as_the_config_says(student_folder, monkeypatch, config_value, expected):
    """The real `from_pretrained` loads the folder; the wrapper only records what it was given."""
    from transformers import AutoModelForImageTextToText

    original = AutoModelForImageTextToText.from_pretrained
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", recording)
    spec = ModelSpec(path=str(student_folder), **({} if config_value is None else {"trust_remote_code": config_value}))
    load_spec(spec)
    assert seen == [expected]


# Ray's token authentication: settings that would turn it off, anywhere the project starts Ray.
AUTH_OFF = re.compile(r"RAY_AUTH_MODE\s*[:=]\s*[\"']?(disabled|none|off)|auth_mode\s*[:=]\s*[\"']?(disabled|none|off)", re.I)
LAUNCH_FILES = [*sorted((REPO / "ckd_ray").rglob("*.py")), *sorted((REPO / "jobs").glob("*")), *sorted((REPO / "scripts").glob("*")),
                *sorted((REPO / "cluster").rglob("*")), *sorted((REPO / "configs").glob("*.yaml")), *sorted((REPO / "benchmarks").rglob("*.py"))]


def test_nothing_the_project_starts_turns_ray_token_auth_off():
    files = [path for path in LAUNCH_FILES if path.is_file()]
    assert len(files) > 50
    offending = [str(path.relative_to(REPO)) for path in files if AUTH_OFF.search(path.read_text(errors="replace"))]
    assert offending == []


def test_readme_cluster_section_keeps_dashboard_and_job_api_private():
    readme = (REPO / "README.md").read_text()
    # Every address a `ray start --head` in the README binds its dashboard (and so the job API) to.
    hosts = re.findall(r"--dashboard-host[ =](\S+)", readme)
    assert hosts, "the README shows no `ray start --head --dashboard-host`"
    public = [host for host in hosts if host.strip("\"'") in ("0.0.0.0", "::")]
    assert public == []
