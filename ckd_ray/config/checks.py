"""Checks across sections: every loss term has its teacher signal, roles exist, teachers are
larger than their learners, model folders are in the Llava layout and each teacher can teach
its learner (same tokenizer, visual tokens and image processor). Each problem names the field
and the fix; nothing here rewrites a value."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from ckd_ray import storage
from ckd_ray.cascade.config import DISTILLATION_STEPS, effective_loss
from ckd_ray.config.job import JobConfig
from ckd_ray.config.loader import Problem
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
        problems += _check_sizes(config)
        problems += model_folder_problems(config)
    if ok("tune", "cascade"):
        problems += _check_tune(config)
    return problems


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
        for attr in ("learner", "teacher"):
            role = getattr(stage, attr)
            if role is not None and role not in config.models:
                close = difflib.get_close_matches(role, roles, n=1)
                fix = f"did you mean `{close[0]}`?" if close else f"add models.{role} or use one of {roles}"
                problems.append(Problem(f"{at}.{attr}", f"role {role!r} is not in models", fix))
        if stage.teacher is not None and stage.teacher == stage.learner:
            problems.append(Problem(f"{at}.teacher", "a model cannot teach itself", "name another role"))
        for j, step in enumerate(stage.steps):
            if step.kind in DISTILLATION_STEPS and stage.teacher is None:
                problems.append(
                    Problem(f"{at}.steps.{j}", f"{step.kind} distills but the stage has no teacher",
                            f"set {at}.teacher, or use SFT/FT for plain training")
                )
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
                message = _missing_signal(term, loss, signal)
                if message and (where, term) not in seen:
                    seen.add((where, term))
                    problems.append(Problem(f"{where}.weights.{term}", message[0], message[1]))
    return problems


def _missing_signal(term: str, loss, signal) -> tuple[str, str] | None:
    off = f"or set the weight to 0"
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


def _model_size(spec) -> int | None:
    """Parameters of a role's LLM when knowable without loading weights (preset or local config.json)."""
    if spec.preset and spec.preset in PRESETS:
        return approx_text_parameters(PRESETS[spec.preset].text)
    if spec.path and not storage.is_s3(spec.path):
        config_file = Path(storage.parse(spec.path).path) / "config.json"
        if config_file.exists():
            text = json.loads(config_file.read_text()).get("text_config", {})
            try:
                from ckd_ray.models.presets import TextTower

                return approx_text_parameters(TextTower(
                    text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"],
                    text["num_attention_heads"], text.get("num_key_value_heads", text["num_attention_heads"]), text["vocab_size"],
                ))
            except KeyError:
                return None
    return None


def _check_sizes(config: JobConfig) -> list[Problem]:
    problems = []
    for i, stage, at in _stages(config):
        if stage.teacher is None or stage.teacher not in config.models or stage.learner not in config.models:
            continue
        learner, teacher = _model_size(config.models[stage.learner]), _model_size(config.models[stage.teacher])
        if learner is not None and teacher is not None and learner >= teacher:
            problems.append(Problem(
                f"{at}.teacher",
                f"learner {stage.learner!r} (~{learner:,} LLM parameters) is not smaller than teacher {stage.teacher!r} (~{teacher:,})",
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
        layout = layout_problem(folder.config)
        if layout:
            problems.append(Problem(field, f"{spec.path} {layout[0]}", layout[1]))
            continue
        folders[role] = folder
    seen = set()
    for _, stage, at in _stages(config):
        pair = (stage.learner, stage.teacher)
        if pair in seen or stage.learner not in folders or stage.teacher not in folders:
            continue
        seen.add(pair)
        for message, fix in pair_problems(folders[stage.learner], folders[stage.teacher]):
            problems.append(Problem(f"{at}.teacher", message, fix))
    return problems


def _check_tune(config: JobConfig) -> list[Problem]:
    problems = []
    names = set(LOSS_TERMS) | set(GREEK_ALIASES) | {"temperature"}
    for key, dim in config.tune.space.items():
        stage, _, name = key.rpartition(".")
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            problems.append(Problem(f"tune.space.{key}", "not a loss term or `temperature`",
                                    f"did you mean `{close[0]}`?" if close else f"use one of {sorted(names)}"))
        if stage and not (stage.isdigit() and 1 <= int(stage) <= len(config.cascade.resolved_stages())):
            problems.append(Problem(f"tune.space.{key}", f"stage prefix {stage!r} names no stage",
                                    f"use 1..{len(config.cascade.resolved_stages())}"))
        if dim.choices is None and (dim.low is None or dim.high is None or dim.low > dim.high):
            problems.append(Problem(f"tune.space.{key}", "needs `choices`, or `low` <= `high`", "set low and high, or choices"))
    return problems
