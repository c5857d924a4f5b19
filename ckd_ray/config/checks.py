"""Checks across sections: every loss term has its teacher signal, roles exist, teachers are
larger than their learners, model folders are in the Llava layout and each teacher can teach
its learner (same tokenizer, visual tokens and image processor). Each problem names the field
and the fix; nothing here rewrites a value."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from ckd_ray import storage
from ckd_ray.config.cascade import DISTILLATION_STEPS, effective_loss
from ckd_ray.config.job import JobConfig
from ckd_ray.errors import Problem
from ckd_ray.losses.config import GREEK_ALIASES, LOSS_TERMS
from ckd_ray.models.presets import PRESETS, approx_text_parameters


def check_consistency(config: JobConfig, valid_sections: set[str] | None = None) -> list[Problem]:
    """Problems between sections; checks that need a section which failed validation are skipped."""
    ok = (lambda *names: all(n in valid_sections for n in names)) if valid_sections is not None else (lambda *names: True)
    problems: list[Problem] = []
    if ok("models", "cascade"):
        problems += _check_roles(config)
    if ok("models", "cascade", "signal", "loss"):
        problems += _check_signal(config)
    if ok("models", "cascade"):
        problems += _check_model_files(config)
        problems += _check_sizes(config)
    if ok("models", "cascade", "signal", "loss"):
        problems += _check_layers(config)
    if ok("models", "cascade"):
        problems += model_folder_problems(config)
    if ok("tune", "cascade"):
        problems += _check_tune(config)
    if ok("models", "cascade"):
        problems += _check_control(config)
    if ok("models", "cascade", "trainer"):
        problems += _check_disjoint_data(config)
    if ok("data", "evaluation"):
        problems += _check_evaluation(config)
    return problems


def _check_control(config: JobConfig) -> list[Problem]:
    """`cascade.student_alone` mirrors the student's steps: there must be some, on one set of hop levels."""
    from ckd_ray.config.cascade import CONTROL_ROLE

    if not config.cascade.student_alone:
        return []
    field = "cascade.student_alone"
    if CONTROL_ROLE in config.models:
        return [Problem(f"models.{CONTROL_ROLE}", f"is the role {field} trains", "rename that role")]
    student = [stage for stage in config.cascade.resolved_stages() if stage.learner == "student"]
    if "student" not in config.models or not student:
        return [Problem(field, "the plan has no student steps to mirror", "remove student_alone, or add stages whose learner is student")]
    if len({tuple(stage.hop_levels or ()) for stage in student}) > 1:
        return [Problem(field, "the student's stages train on different hop levels (a curriculum), which one control stage cannot mirror",
                        "remove student_alone and compare with the experiment's student_only row (ckd-ray experiment)")]
    return []


def _check_disjoint_data(config: JobConfig) -> list[Problem]:
    """`cascade.disjoint_data` sizes each learner's pool from its steps' budgets: every step needs one."""
    if not config.cascade.disjoint_data or config.trainer.max_steps is not None:
        return []
    cascade = config.cascade
    unbudgeted = [f"{stage.label}/{step.kind}" for stage in cascade.resolved_stages() for step in stage.steps if step.max_steps is None]
    unbudgeted += [f"teacher preparation/{step.kind}" for role, model in config.models.items() for step in cascade.prep_steps(role)
                   if step.max_steps is None and cascade.prepare_teachers and model.needs_preparation]
    if not unbudgeted:
        return []
    return [Problem("cascade.disjoint_data", f"the steps {unbudgeted} have no step budget, so their share of the data pool is undefined",
                    "set trainer.max_steps (or max_steps on each step), or remove disjoint_data")]


def _check_evaluation(config: JobConfig) -> list[Problem]:
    """An evaluation that can only select nothing or the training data: no `evaluation.sources`, so
    the held-out `evaluation.split` of the instruction data is scored, while the job lists its own
    instruction sources and trains on every record of each (no `split` on any). LLaVA-1.5's
    instruction data has no `split` key, so its `test` split is empty; data that has one would be
    scored on the very records the student trained on. Whether a source's records carry splits is
    read when the job starts (`ckd_ray.evaluate.sets`); this is the part a config shows."""
    data = config.data
    if config.evaluation.sources or not data.instructions or any(s.split for s in data.instructions):
        return []
    return [Problem(
        "evaluation.sources",
        f"is empty, so the instruction data's split {config.evaluation.split!r} would be scored, but the job trains on "
        "every record of data.instructions (no `split` on any source): that selects nothing (LLaVA-1.5's data has no "
        "`split` key) or the training records themselves",
        "list evaluation sets apart from the training data under evaluation.sources (format pope, scienceqa, vqav2 "
        "or llava; see configs/llava_ckd_0.5b.yaml), or set `split: train` on each data.instructions source so a held-out split remains",
    )]


def _stages(config: JobConfig):
    """(index, stage, field prefix) of every stage, listed or expanded from a named plan."""
    for i, stage in enumerate(config.cascade.resolved_stages()):
        yield i, stage, (f"cascade.plan[{config.cascade.plan}].stage{i}" if config.cascade.plan else f"cascade.stages.{i}")


def _check_roles(config: JobConfig) -> list[Problem]:
    problems = []
    roles = list(config.models)
    if "student" not in config.models:
        problems.append(Problem("models.student", "no student model", "add models.student (e.g. `preset: tiny-student`)"))
    for i, stage, at in _stages(config):
        named = [("learner", stage.learner), ("teacher", stage.teacher)] + [(f"teachers.{j}", r) for j, r in enumerate(stage.teachers)]
        for attr, role in named:
            if role is not None and role not in config.models:
                close = difflib.get_close_matches(role, roles, n=1)
                fix = f"did you mean `{close[0]}`?" if close else f"add models.{role} or use one of {roles}"
                problems.append(Problem(f"{at}.{attr}", f"role {role!r} is not in models", fix))
        if stage.learner in stage.teacher_roles:
            field = "teacher" if stage.teacher else f"teachers.{stage.teachers.index(stage.learner)}"
            problems.append(Problem(f"{at}.{field}", "a model cannot teach itself", "name another role"))
        for j, step in enumerate(stage.steps):
            if step.kind in DISTILLATION_STEPS and not stage.teacher_roles:
                problems.append(
                    Problem(f"{at}.steps.{j}", f"{step.kind} distills but the stage has no teacher",
                            f"set {at}.teacher, or use SFT/FT for plain training")
                )
        if stage.teachers:
            problems += [problem for problem in _check_fusion(config, stage, at) if problem not in problems]  # a job-wide loss once
    for role in config.cascade.role_prep_steps:
        if role not in config.models:
            close = difflib.get_close_matches(role, roles, n=1)
            problems.append(Problem(f"cascade.role_prep_steps.{role}", f"role {role!r} is not in models",
                                    f"did you mean `{close[0]}`?" if close else f"use one of {roles}"))
    return problems


def _check_fusion(config: JobConfig, stage, at: str) -> list[Problem]:
    """A fused stage's `loss.fusion`: weights name its teachers, are >= 0 and not all 0; the terms
    it cannot fuse yet are off."""
    problems: list[Problem] = []
    if not config.teacher_pool.use_cache and any(step.kind in DISTILLATION_STEPS for step in stage.steps):
        problems.append(Problem("teacher_pool.use_cache", f"is false, but {at} fuses several teachers, whose passes are read from the cache",
                                "set teacher_pool.use_cache: true"))
    seen: set[str] = set()
    for j, step in enumerate(stage.steps):
        if step.kind not in DISTILLATION_STEPS:
            continue
        loss = effective_loss(config.loss, stage, step)
        where = f"{at}.steps.{j}.loss" if step.loss else (f"{at}.loss" if stage.loss else "loss")
        if where in seen:
            continue
        seen.add(where)
        fusion = loss.fusion
        for role in sorted(set(fusion.weights) - set(stage.teachers)):
            problems.append(Problem(f"{where}.fusion.weights.{role}", f"is not one of the stage's teachers {stage.teachers}",
                                    f"weigh one of {stage.teachers}, or remove it"))
        bad = {role: w for role, w in fusion.weights.items() if not w >= 0}
        for role, weight in bad.items():
            problems.append(Problem(f"{where}.fusion.weights.{role}", f"= {weight} must be >= 0", "set a weight >= 0"))
        if not bad and not any(fusion.weight_of(role) > 0 for role in stage.teachers):
            problems.append(Problem(f"{where}.fusion.weights", f"every teacher of {stage.teachers} weighs 0",
                                    "give at least one teacher a weight > 0"))
        if loss.weights.feature > 0:
            problems.append(Problem(f"{where}.weights.feature", "> 0 in a stage with several teachers: one feature projection "
                                    "per teacher is not built yet", "set the weight to 0 in this stage, or distill from one `teacher`"))
    return problems


def _check_signal(config: JobConfig) -> list[Problem]:
    """A weight > 0 whose teacher signal is not requested would crash mid-run: catch it here."""
    signal = config.signal
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for i, stage, at in _stages(config):
        for j, step in enumerate(stage.steps):
            if step.kind not in DISTILLATION_STEPS:
                continue
            loss = effective_loss(config.loss, stage, step)
            where = f"{at}.steps.{j}" if step.loss else (f"{at}.loss" if stage.loss else "loss")
            for term in loss.weights.active():
                message = missing_signal(term, loss, signal)
                if message and (where, term) not in seen:
                    seen.add((where, term))
                    problems.append(Problem(f"{where}.weights.{term}", message[0], message[1]))
    return problems


def missing_signal(term: str, loss, signal) -> tuple[str, str] | None:
    off = "or set the weight to 0"
    if term == "output" and signal.response_top_k == 0:
        return "> 0 but signal.response_top_k is 0", f"set signal.response_top_k (e.g. 64), {off}"
    if term == "visual_kl" and signal.visual_top_k == 0:
        return "> 0 but signal.visual_top_k is 0", f"set signal.visual_top_k (e.g. 64), {off}"
    if term == "visual_relation" and not signal.gram:
        return "> 0 but signal.gram is false", f"set signal.gram: true, {off}"
    if term == "knowledge" and not signal.facts:
        return "> 0 but signal.facts is false", f"set signal.facts: true, {off}"
    if term == "feature":
        if not loss.feature_layers:
            return "> 0 but loss.feature_layers is empty", f"map student to teacher layers in loss.feature_layers, {off}"
        missing = sorted(set(loss.feature_layers.values()) - set(signal.feature_layers))
        if missing:
            return f"> 0 but teacher layers {missing} are not in signal.feature_layers", f"add them to signal.feature_layers, {off}"
    if term == "attention":
        if not loss.attention_layers:
            return "> 0 but loss.attention_layers is empty", f"map student to teacher layers in loss.attention_layers, {off}"
        missing = sorted(set(loss.attention_layers.values()) - set(signal.attention_layers))
        if missing:
            return f"> 0 but teacher layers {missing} are not in signal.attention_layers", f"add them to signal.attention_layers, {off}"
    return None


def _local_json(spec, name: str):
    """The parsed `name` of a role's local model folder; None if there is none or it does not
    parse (`_check_model_files` reports that)."""
    if not spec.path or storage.is_s3(spec.path):
        return None
    file = Path(storage.parse(spec.path).path) / name
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # absent, unreadable, not UTF-8, not JSON
        return None


def _check_model_files(config: JobConfig) -> list[Problem]:
    """A local model folder's config.json and tokenizer.json, where present, must parse: the size
    and tokenizer checks read them, and so does loading, later and on a worker."""
    problems = []
    for role, spec in config.models.items():
        if not spec.path or storage.is_s3(spec.path):
            continue
        for name, kind in (("config.json", dict), ("tokenizer.json", dict)):
            file = Path(storage.parse(spec.path).path) / name
            if file.is_file() and not isinstance(_local_json(spec, name), kind):
                problems.append(Problem(f"models.{role}.path", f"{file} is not a JSON object",
                                        f"restore {name} from the model's source, or point models.{role}.path at an intact copy"))
    return problems


def _model_size(spec) -> int | None:
    """Parameters of a role's LLM when knowable without loading weights (preset or local config.json)."""
    if spec.preset and spec.preset in PRESETS:
        return approx_text_parameters(PRESETS[spec.preset].text)
    model_config = _local_json(spec, "config.json")
    text = model_config.get("text_config") if isinstance(model_config, dict) else None
    if not isinstance(text, dict):
        return None
    from ckd_ray.models.presets import TextTower

    try:
        return approx_text_parameters(TextTower(
            text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"],
            text["num_attention_heads"], text.get("num_key_value_heads", text["num_attention_heads"]), text["vocab_size"],
        ))
    except (KeyError, TypeError, ZeroDivisionError):  # fields missing or not numbers: size unknown, no check
        return None


def _num_layers(spec) -> int | None:
    """Layers of a role's LLM when knowable without loading weights (preset or local config.json)."""
    if spec.preset and spec.preset in PRESETS:
        return PRESETS[spec.preset].text.num_hidden_layers
    model_config = _local_json(spec, "config.json")
    text = model_config.get("text_config") if isinstance(model_config, dict) else None
    layers = text.get("num_hidden_layers") if isinstance(text, dict) else None
    return layers if isinstance(layers, int) else None


def _check_layers(config: JobConfig) -> list[Problem]:
    """The layers the signal and the loss name exist: hidden states 0..L (0 = the embeddings) for
    features, attention maps of layers 0..L-1, in each distilling stage's teacher (signal) and
    learner (the loss's keys)."""
    problems: list[Problem] = []
    distilling = [(stage, at) for _, stage, at in _stages(config) if stage.teacher_roles and any(s.kind in ("DPT", "DFT") for s in stage.steps)]
    seen: set[tuple[str, str]] = set()
    for stage, at in distilling:
        loss = stage.loss or config.loss
        for role, side in [(teacher, "teacher") for teacher in stage.teacher_roles] + [(stage.learner, "learner")]:
            spec = config.models.get(role)
            layers = _num_layers(spec) if spec is not None else None
            if layers is None or (role, side) in seen:
                continue
            seen.add((role, side))
            if side == "teacher":
                named = [("signal.feature_layers", i, layers) for i in config.signal.feature_layers]
                named += [("signal.attention_layers", i, layers - 1) for i in config.signal.attention_layers]
            else:
                named = [("loss.feature_layers", i, layers) for i in loss.feature_layers]
                named += [("loss.attention_layers", i, layers - 1) for i in loss.attention_layers]
            for field, index, last in named:
                if not 0 <= index <= last:
                    kind = "hidden states 0..{0} (0: the embeddings)" if "feature" in field else "attention layers 0..{0}"
                    problems.append(Problem(field, f"layer {index} is not in {side} {role!r} ({layers} layers: {kind.format(last)})",
                                            f"name a layer of {role!r}, e.g. its last, {last}"))
    return problems


def _check_sizes(config: JobConfig) -> list[Problem]:
    problems = []
    for i, stage, at in _stages(config):
        for j, role in enumerate(stage.teacher_roles):
            if role not in config.models or stage.learner not in config.models:
                continue
            learner, teacher = _model_size(config.models[stage.learner]), _model_size(config.models[role])
            if learner is not None and teacher is not None and learner >= teacher:
                problems.append(Problem(
                    f"{at}.teachers.{j}" if stage.teachers else f"{at}.teacher",
                    f"learner {stage.learner!r} (~{learner:,} LLM parameters) is not smaller than teacher {role!r} (~{teacher:,})",
                    "swap the roles, or give the teacher role a larger model",
                ))
    return problems


def model_folder_problems(config: JobConfig, *, at_start: bool = False) -> list[Problem]:
    """Problems of the roles' model folders, read from their small files (no weights): a layout
    that needs converting, and each stage's teacher/learner pair that cannot be distilled
    (tokenizer, vocabulary rows, visual tokens, image token, image processor; see
    `ckd_ray.models.folders.pair_problems`). At config load only local folders that exist are
    read (a quickstart names folders it composes later); `at_start`, when a run begins and
    before any actor starts, every folder is read, s3:// included, and must exist."""
    from ckd_ray.models.folders import COMPOSE_HINT, layout_problem, pair_problems, read_model_folder

    folders = {}
    problems: list[Problem] = []
    for role, spec in config.models.items():
        if not spec.path or (not at_start and (storage.is_s3(spec.path) or not storage.exists(spec.path))):
            continue
        field = f"models.{role}.path"
        try:
            folder = read_model_folder(spec.path)
        except FileNotFoundError as err:
            problems.append(Problem(field, str(err), f"give a Hugging Face Llava folder, or compose one: {COMPOSE_HINT}"))
            continue
        except (ValueError, RecursionError):  # a small file that is not JSON: _check_model_files names it
            continue
        layout = layout_problem(folder.config)
        if layout:
            problems.append(Problem(field, f"{spec.path} {layout[0]}", layout[1]))
            continue
        folders[role] = folder
    seen = set()
    pairs = [(stage.learner, role, f"{at}.teachers.{j}" if stage.teachers else f"{at}.teacher")
             for _, stage, at in _stages(config) for j, role in enumerate(stage.teacher_roles)]
    for learner, teacher, field in pairs:
        pair = (learner, teacher)
        if pair in seen or learner not in folders or teacher not in folders:
            continue
        seen.add(pair)
        try:
            found = pair_problems(folders[learner], folders[teacher])
        except (AttributeError, KeyError, TypeError):  # JSON, but not the files transformers writes
            found = []
            for role in pair:
                problems.append(Problem(f"models.{role}.path", "its tokenizer.json, config.json or preprocessor_config.json is not a Hugging Face file",
                                        f"restore them from the model's source, or point models.{role}.path at an intact copy"))
        for message, fix in found:
            problems.append(Problem(field, message, fix))
    return problems


def _check_tune(config: JobConfig) -> list[Problem]:
    problems = []
    names = set(LOSS_TERMS) | set(GREEK_ALIASES) | {"temperature", "fusion_temperature"}
    for key, dim in config.tune.space.items():
        stage, _, name = key.rpartition(".")
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            problems.append(Problem(f"tune.space.{key}", "not a loss term, `temperature` or `fusion_temperature`",
                                    f"did you mean `{close[0]}`?" if close else f"use one of {sorted(names)}"))
        if stage and not (stage.isdigit() and 1 <= int(stage) <= len(config.cascade.resolved_stages())):
            problems.append(Problem(f"tune.space.{key}", f"stage prefix {stage!r} names no stage",
                                    f"use 1..{len(config.cascade.resolved_stages())}"))
        if dim.choices is None and (dim.low is None or dim.high is None or dim.low > dim.high):
            problems.append(Problem(f"tune.space.{key}", "needs `choices`, or `low` <= `high`", "set low and high, or choices"))
    return problems


def check_storage(config: JobConfig) -> list[Problem]:
    """What the job reads exists, and every S3 bucket it reads or writes answers with the
    credentials of the environment. Unlike the checks above this touches storage (a stat, or one
    S3 request, per location), so it runs when a job starts (`run_cascade`, `run_tune`, the CLI
    commands that run), before Ray does, and not in `validate_config`: a config can be checked
    on a machine that does not see its data."""
    probe = _StorageProbe(submitted_job_working_dir())
    problems: list[Problem] = []
    data = config.data
    benchmark = data.benchmark_root
    if benchmark is not None and not (data.captions and data.instructions):
        root_missing = probe.missing("data.benchmark_root", benchmark, "build it with `ckd-ray data build-kvqa <folder>`, or fix the path")
        problems += root_missing
        names = ("captions.json", "instructions.json", "images") + (() if data.processor else ("processor",))
        for name in names if not root_missing else ():
            problems += probe.missing("data.benchmark_root", storage.join(benchmark, name), "rebuild it with `ckd-ray data build-kvqa <folder>`")
        if not root_missing and not (data.captions or data.instructions):
            problems += probe.missing("data.benchmark_root", storage.join(benchmark, "baselines.json"),
                                      "it was built before the benchmark's version 2 (answers that need the image, and "
                                      "the no-model baselines every score stands beside): rebuild it with `ckd-ray data build-kvqa <folder>`")
    for kind in ("captions", "instructions"):
        for i, source in enumerate(getattr(data, kind)):
            problems += probe.missing(f"data.{kind}[{i}].uri", source.uri, "fix the path or URI")
            if source.image_root is not None:
                problems += probe.missing(f"data.{kind}[{i}].image_root", source.image_root, "fix the path or URI")
    if data.processor:
        problems += probe.missing("data.processor", data.processor, "fix the path or URI of the tokenizer folder")
    problems += _evaluation_source_problems(config, probe)
    for role, spec in config.models.items():
        if spec.path:
            problems += probe.missing(f"models.{role}.path", spec.path, "fix the path or URI of the model folder")
    problems += probe.writable("storage.root", config.storage.root)
    if config.storage.signal_cache:
        problems += probe.writable("storage.signal_cache", config.storage.signal_cache)
    return problems + submitted_job_problems(config)


def _evaluation_source_problems(config: JobConfig, probe: "_StorageProbe") -> list[Problem]:
    """Every file of each evaluation source exists (POPE: its strategies' files in the folder).
    Whether a source selects any record is known only once it is read: `run_cascade` reads the
    evaluation sets next, still before Ray starts (see `ckd_ray.evaluate.sets`)."""
    from ckd_ray.data.eval_sets import POPE_STRATEGIES, pope_file

    problems: list[Problem] = []
    for i, source in enumerate(config.evaluation.sources):
        at = f"evaluation.sources[{i}]"
        uri_missing = probe.missing(f"{at}.uri", source.uri, "fix the path or URI")
        problems += uri_missing
        if source.format == "pope" and not uri_missing:
            for strategy in (source.split,) if source.split else POPE_STRATEGIES:
                fix = f"put POPE's coco_pope_{strategy}.json in that folder" + ("" if source.split else ", or set split: to a strategy you have")
                problems += probe.missing(f"{at}.uri", pope_file(source.uri, strategy), fix)
        for key in ("image_root", "annotations"):
            if getattr(source, key) is not None:
                problems += probe.missing(f"{at}.{key}", getattr(source, key), "fix the path or URI")
    return problems


def submitted_job_working_dir() -> Path | None:
    """The folder a `ray job submit --working-dir` job runs in (Ray's uploaded copy of the
    submitter's folder, read from the job config Ray's job supervisor hands its driver), or None
    outside such a job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {} if raw else {}
    except (ValueError, AttributeError):
        return None
    return Path.cwd().resolve() if isinstance(runtime_env, dict) and runtime_env.get("working_dir") else None


def submitted_job_problems(config: JobConfig, working_dir: Path | None = None) -> list[Problem]:
    """Outputs that a submitted job would write into its uploaded working directory: Ray deletes
    that copy when the job ends and every node has its own, so checkpoints written there by one
    node are lost to the others. Paths are resolved at load against the directory the command runs
    in, which for a submitted job is that copy: a relative `storage.root: runs` lands there."""
    working_dir = working_dir or submitted_job_working_dir()
    if working_dir is None:
        return []
    problems = []
    for field, uri in (("storage.root", config.storage.root), ("storage.signal_cache", config.storage.signal_cache)):
        loc = storage.parse(uri) if uri else None
        if loc is not None and loc.scheme == "file" and Path(loc.path).resolve().is_relative_to(working_dir):
            problems.append(Problem(
                field,
                f"{loc.path} is inside this submitted job's copy of its working directory ({working_dir}), which Ray "
                "deletes when the job ends and which each node holds separately",
                f"give an s3:// URI or an absolute path on storage every node shares, e.g. --set {field}=s3://bucket/runs",
            ))
    return problems


class _StorageProbe:
    """Existence checks for local paths and S3 URIs; one S3 failure per bucket is reported once."""

    def __init__(self, job_working_dir: Path | None = None):
        self.job_working_dir = job_working_dir
        self._bucket_errors: dict[str, tuple[str, str] | None] = {}
        self._client = None

    def missing(self, field: str, uri: str, fix: str) -> list[Problem]:
        loc = storage.parse(uri)
        if loc.scheme == "file":
            if Path(loc.path).exists():
                return []
            if self.job_working_dir and Path(loc.path).resolve().is_relative_to(self.job_working_dir):
                fix = (f"{fix}; this submitted job runs in Ray's upload of its working directory, which leaves out the "
                       "runtime_env's excludes (jobs/runtime_env.yaml excludes data/ and runs/): give an absolute "
                       "path every node can read, or an s3:// URI")
            return [Problem(field, f"{loc.path} does not exist", fix)]
        failure = self._s3_failure(loc.bucket, loc.path)
        if failure == ("absent", ""):
            return [Problem(field, f"nothing at {storage.redact(uri)}", fix)]
        return [Problem(field, *failure)] if failure else []

    def writable(self, field: str, uri: str) -> list[Problem]:
        loc = storage.parse(uri)
        if loc.scheme == "file":
            path = Path(loc.path)
            if path.exists() and not path.is_dir():
                return [Problem(field, f"{path} is a file, not a folder", "give a folder (it is created if missing)")]
            return []
        failure = self._s3_failure(loc.bucket, loc.path)
        return [Problem(field, *failure)] if failure and failure[0] != "absent" else []

    def _s3_failure(self, bucket: str, key: str) -> tuple[str, str] | None:
        """None if `key` (or a key under it) exists in `bucket`; ("absent", "") if the bucket
        answers but holds nothing there; else (what is wrong, fix). Never includes credentials."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if bucket in self._bucket_errors and self._bucket_errors[bucket]:
            return self._bucket_errors[bucket]
        failure = None
        try:
            response = self._s3().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
            self._bucket_errors[bucket] = None
            return None if response.get("KeyCount", 0) > 0 else ("absent", "")
        except NoCredentialsError:
            failure = (f"no S3 credentials for bucket {bucket!r}",
                       "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile) in the environment")
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchBucket", "404"):
                failure = (f"S3 bucket {bucket!r} does not exist", "create the bucket, or fix the bucket name")
            elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"):
                failure = (f"S3 refused the credentials from the environment for bucket {bucket!r} ({code})",
                           "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (and AWS_ENDPOINT_URL)")
            elif code in ("AccessDenied", "403", "AllAccessDisabled"):
                failure = (f"access to S3 bucket {bucket!r} is denied ({code})",
                           "grant these credentials s3:ListBucket, s3:GetObject and s3:PutObject on it, or use another bucket")
            else:
                failure = (f"S3 bucket {bucket!r} answered {code or 'an error'}", "check the bucket name and the AWS_* environment")
        except BotoCoreError as err:  # endpoint unreachable, bad endpoint URL, ...
            endpoint = storage.redact(os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint")
            failure = (f"S3 is not reachable at {endpoint} for bucket {bucket!r} ({type(err).__name__})",
                       "check AWS_ENDPOINT_URL and the network")
        self._bucket_errors[bucket] = failure
        return failure

    def _s3(self):
        if self._client is None:
            from botocore.config import Config

            # Few, short retries: an unreachable endpoint is a config problem, reported in seconds.
            self._client = storage.s3_client(config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
        return self._client
