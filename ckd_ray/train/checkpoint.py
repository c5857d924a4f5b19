"""Checkpoints of a training step: tensors as safetensors, everything else as JSON, never a pickle.

One checkpoint directory holds

    model/                  the student in the Hugging Face format (config.json, model.safetensors,
                            tokenizer and processor files): loadable as it is; export copies it
    projection.safetensors  the feature projection (only when the `feature` term is on)
    optimizer.safetensors   the AdamW moments of every trainable parameter, gathered across ZeRO
                            partitions and keyed by parameter name: `<name>.exp_avg`,
                            `<name>.exp_avg_sq`, and `<name>.master` (the fp32 master weight)
                            when the weights train in bf16
    train_state.json        optimizer step (the lr schedule's state, with its settings), data
                            position, counters and the report history
    checksums.json          the sha256 of every other file, written last: a checkpoint whose
                            files differ from it (truncated, corrupted) is refused on read

Because the optimizer state is stored per parameter, not per ZeRO partition, it loads under any
ZeRO stage; the data position, though, is counted in micro-batches of each worker's shard, so a
step resumes with the worker count and micro-batch size it was checkpointed with. DeepSpeed's
own `save_checkpoint` is not used: it writes `torch.save` pickles, which must not be read back
from shared storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ckd_ray.models.builder import save_processor_files

FORMAT_VERSION = 1
MODEL_DIR = "model"
PROJECTION_FILE = "projection.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
CHECKSUM_FILE = "checksums.json"
# What torch.save and pickle write: never written here, so never read from a checkpoint folder.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainState:
    """Where a step stands: what `train_state.json` holds besides the format version."""

    step_id: str = ""
    """The planned step this checkpoint belongs to (a worker group trains several in turn)."""
    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Current pass over the data (0-based)."""
    batches_in_epoch: int = 0
    """Micro-batches of `epoch` each worker has trained on (all shards are the same size)."""
    samples_seen: int = 0
    """Samples trained on, all workers together."""
    tokens_seen: int = 0
    """Non-padding tokens trained on, all workers together."""
    num_workers: int = 0
    """Workers that wrote the data position (resuming needs the same, shards depend on it)."""
    micro_batch_size: int = 0
    """Micro-batch size that wrote the data position (resuming needs the same)."""
    schedule: dict = field(default_factory=dict)
    """AdamW and lr-schedule settings (peak lr, weight decay, warm-up and total steps): the
    scheduler's state is these plus `step`, and resuming needs the same."""
    history: list[dict] = field(default_factory=list)
    """Every metrics report so far, oldest first."""
    resumed_from: list[int] = field(default_factory=list)
    """The step each restart or resubmission of this step resumed from, in order."""

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        data = json.loads(text)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"checkpoint format version {version!r} is not {FORMAT_VERSION}: it was written by another ckd_ray version")
        return cls(**data)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files differ from the checksums written with them: nothing of it is loaded."""


def read_state(directory: str | Path) -> TrainState:
    """The checkpoint's train state, once its files match their checksums (see `verify_checksums`)."""
    verify_checksums(directory)
    return TrainState.from_json((Path(directory) / STATE_FILE).read_text())


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: str | Path) -> None:
    """Records the sha256 of every file of the checkpoint; called after the last one is written."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)
    checksums = {str(p.relative_to(directory)): _file_sha256(p) for p in files}
    (directory / CHECKSUM_FILE).write_text(json.dumps({"sha256": checksums}, indent=1))


def verify_checksums(directory: str | Path) -> None:
    """CorruptCheckpointError naming each file that is missing, or whose bytes differ from those
    written, or for any pickle file (`PICKLE_SUFFIXES`) planted in the folder. A checkpoint from
    before checksums has no checksums.json and is read as it is; other files added beside the
    recorded ones (by the storage layer) are not checked."""
    directory = Path(directory)
    pickles = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CorruptCheckpointError(
            f"checkpoint {directory} holds pickle files this project never writes ({', '.join(pickles[:5])}): "
            "checkpoints are read as safetensors and JSON only, since unpickling a file can run any code; "
            "it is refused. Remove those files if you trust the rest of the folder"
        )
    listing = directory / CHECKSUM_FILE
    if not listing.exists():
        return
    try:
        recorded = json.loads(listing.read_text())["sha256"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"checkpoint {directory}: {listing} is not the checksum list this project writes ({err})") from None
    problems = []
    for name, checksum in recorded.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif _file_sha256(path) != checksum:
            problems.append(f"{path} does not match its sha256 (truncated or corrupted)")
    if problems:
        raise CorruptCheckpointError(
            f"checkpoint {directory} is damaged and is not loaded: {'; '.join(problems)}. Restore the files "
            "from a copy, or run the job again under a new `name` (--set name=...)"
        )


@contextlib.contextmanager
def checkpoint_directory(checkpoint):
    """A local folder with `checkpoint`'s files, this process's own: a local checkpoint's folder
    itself; a remote one downloaded into a temporary folder, removed on exit.

    Not Ray's `Checkpoint.as_directory`: its folder is shared by the processes of a node, and
    whichever enters it while no other holds its lock downloads it again, in place, over the files
    a worker that entered earlier has memory-mapped (the safetensors weights): that worker dies of
    SIGBUS while loading (seen when two workers resume from S3)."""
    import tempfile

    from pyarrow.fs import LocalFileSystem

    if isinstance(checkpoint.filesystem, LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="ckd-checkpoint-") as local:
        yield checkpoint.to_directory(local)


def resume_checkpoint(checkpoint, checkpoint_prefixes: list[str], log=print):
    """(checkpoint, its TrainState) to resume from: `checkpoint` (a `ray.train.Checkpoint`, the
    latest one of the run) when its files match their checksums. When they do not, the newest
    earlier checkpoint of the same run folder that does, with a line on `log` naming both:
    `checkpoint_prefixes` are the group's steps' checkpoint folders in training order
    (`StepPlan.checkpoint_prefix`), and only their checkpoints are candidates. A fallback to the
    last checkpoint of an earlier step means that step is finished and the damaged one starts
    over. With no good checkpoint left, CorruptCheckpointError naming every damaged one.
    Ray Train's `CheckpointConfig(num_to_keep)` decides how many there are to fall back on."""
    try:
        with checkpoint_directory(checkpoint) as directory:
            return checkpoint, read_state(directory)
    except CorruptCheckpointError as err:
        damaged = [str(err)]
    for candidate in _earlier_checkpoints(checkpoint, checkpoint_prefixes):
        try:
            with checkpoint_directory(candidate) as directory:
                state = read_state(directory)
        except CorruptCheckpointError as err:
            damaged.append(str(err))
            continue
        log(f"[train] {damaged[0]}; resuming from the previous good checkpoint {candidate.path} instead "
            f"(step {state.step_id or '?'}, optimizer step {state.step})")
        return candidate, state
    raise CorruptCheckpointError(
        " | ".join(damaged) + f" | no earlier checkpoint of this run verifies ({len(damaged) - 1} tried). Restore the "
        "files from a copy, or run the job again under a new `name` (--set name=...)"
    )


def _earlier_checkpoints(checkpoint, checkpoint_prefixes: list[str]):
    """Checkpoints of the run that come before `checkpoint`, newest first: those of its own step
    with fewer optimizer steps, then those of the steps before it."""
    import posixpath
    import re

    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    filesystem = checkpoint.filesystem
    parent, name = posixpath.split(checkpoint.path.rstrip("/"))
    matched = re.fullmatch(r"step-(\d+)", name)
    prefixes = list(dict.fromkeys(prefix.strip("/") for prefix in checkpoint_prefixes))
    own = posixpath.basename(parent) if posixpath.basename(parent) in prefixes else ""
    if not matched or own not in prefixes:
        return
    run = posixpath.dirname(parent) if own else parent
    latest = int(matched.group(1))
    for prefix in reversed(prefixes[: prefixes.index(own) + 1]):
        folder = posixpath.join(run, prefix) if prefix else run
        try:
            infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except OSError:
            continue
        numbers = sorted((int(found.group(1)) for info in infos if info.type == pafs.FileType.Directory
                          for found in [re.fullmatch(r"step-(\d+)", info.base_name)] if found), reverse=True)
        for number in numbers:
            if prefix == own and number >= latest:
                continue
            yield Checkpoint(posixpath.join(folder, f"step-{number:07d}"), filesystem=filesystem)


def trainable_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in module.named_parameters() if param.requires_grad]


def write_checkpoint(engine, state: TrainState, directory: str | Path, *, processor_dir: str | Path, is_writer: bool) -> None:
    """Collective: every rank takes part in gathering weights and optimizer state; only the
    writer (rank 0) writes `directory`."""
    module = engine.module
    optimizer_state = gather_optimizer_state(engine)  # collective
    with _gathered_weights(engine):  # collective under ZeRO-3
        if not is_writer:
            return
        directory = Path(directory)
        module.student.save_pretrained(directory / MODEL_DIR, safe_serialization=True)
        if module.projection is not None:
            save_file(_contiguous(module.projection.state_dict()), str(directory / PROJECTION_FILE))
    save_processor_files(processor_dir, directory / MODEL_DIR)  # tokenizer, image processor, LlavaProcessor config
    save_file(optimizer_state, str(directory / OPTIMIZER_FILE))
    (directory / STATE_FILE).write_text(state.to_json())
    write_checksums(directory)


def load_projection(projection: torch.nn.Module, directory: str | Path) -> None:
    projection.load_state_dict(load_file(str(Path(directory) / PROJECTION_FILE)))


def gather_optimizer_state(engine) -> dict[str, torch.Tensor]:
    """Full (unpartitioned) AdamW moments of every trainable parameter, on every rank, in fp32.
    Collective under ZeRO (all-reduce or all-gather per parameter)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    save_master = _trains_in_low_precision(engine)
    base = _base_optimizer(engine)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in trainable_parameters(engine.module):
        for key in ADAM_STATE_KEYS:
            value = safe_get_full_optimizer_state(param, key)
            if value is None:  # no ZeRO and fp32: AdamW holds the parameter itself
                value = base.state[param][key]
            tensors[f"{name}.{key}"] = value
        if save_master:
            tensors[f"{name}.master"] = safe_get_full_fp32_param(param)
    return {name: value.detach().to("cpu", torch.float32).contiguous() for name, value in tensors.items()}


def restore_optimizer_state(engine, directory: str | Path, step: int) -> None:
    """Writes a checkpoint's AdamW moments (and fp32 master weights) into a freshly initialised
    engine whose weights were loaded from the same checkpoint, and sets AdamW's step count."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    tensors = load_file(str(Path(directory) / OPTIMIZER_FILE))
    named = trainable_parameters(engine.module)
    missing = [f"{name}.{key}" for name, _ in named for key in ADAM_STATE_KEYS if f"{name}.{key}" not in tensors]
    if missing:
        raise ValueError(
            f"checkpoint {directory} has no optimizer state for {len(missing)} trainable tensors (e.g. {missing[:3]}): "
            "it was written by a step with another freeze policy or loss"
        )
    _materialize_adam_state(engine, step)
    for name, param in named:
        for key in ADAM_STATE_KEYS:
            value = tensors[f"{name}.{key}"]
            if _is_partitioned(param):
                safe_set_full_optimizer_state(param, value.to(param.device), key)
            else:
                _base_optimizer(engine).state[param][key].copy_(value.view_as(param))
        if f"{name}.master" in tensors and _is_partitioned(param):
            safe_set_full_fp32_param(param, tensors[f"{name}.master"].to(param.device))


def _materialize_adam_state(engine, step: int) -> None:
    """AdamW creates its state lazily at the first step, and DeepSpeed links each parameter's
    view into the flat state of its partition after that. Create the state now (zeros, the
    checkpoint's step count) and link the views, so the full tensors can be written through
    DeepSpeed's per-parameter API before any step."""
    base = _base_optimizer(engine)
    for partition in _state_keys(engine):
        base.state[partition] = {
            "step": torch.tensor(float(step), dtype=torch.float32),
            "exp_avg": torch.zeros_like(partition, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(partition, memory_format=torch.preserve_format),
        }
    link_views = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link_views is not None:  # ZeRO-1/2 and DeepSpeed's bf16 optimizer
        link_views()


def _state_keys(engine) -> list[torch.Tensor]:
    """The tensors AdamW keys its state by on this rank: ZeRO-3's flat fp32 partitions (handed to
    AdamW one at a time at each step); otherwise the parameters of AdamW's groups (flat fp32
    partitions under ZeRO-1/2 and the bf16 optimizer, the model's own parameters without ZeRO)."""
    if engine.zero_optimization_stage() == 3:
        return list(engine.optimizer.fp32_partitioned_groups_flat)
    return [param for group in _base_optimizer(engine).param_groups for param in group["params"]]


def _base_optimizer(engine) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _is_partitioned(param) -> bool:
    """Whether DeepSpeed keeps this parameter's optimizer state in flat partitions."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _trains_in_low_precision(engine) -> bool:
    return any(param.dtype != torch.float32 for _, param in trainable_parameters(engine.module))


def _gathered_weights(engine):
    """Full weights on every rank for the duration of the block (ZeRO-3 partitions them)."""
    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
