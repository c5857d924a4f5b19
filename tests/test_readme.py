"""The README's commands, checked as written.

Every command of a ```bash block and every ```python block of README.md has an entry in
`CHECKS`; a command without one fails `test_every_readme_command_has_a_check`. An entry either
runs the command, exactly as written plus `--set` overrides that only shrink budgets, from the
root of a fresh copy of the repository (`test_readme_commands_run_as_written`: 10 min 38 s on
2 cores, 5 min 11 s of it the shrunk experiment and 2 min 46 s the shrunk search; so it is outside
the default run, which must stay under 12; `bash scripts/test.sh -m readme` runs it, printing each
command's time with `-s`), or names the
test that runs it in another form and why (a Ray cluster of its own, public checkpoints, a GPU
node, the internet)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Budgets of the runs: 2 optimizer steps a step (teacher preparation too: its steps carry their own
# budgets), 8 evaluation samples, 2 Tune trials of 2 steps.
SHRINK = ["trainer.max_steps=2", "trainer.checkpoint_every=2", "evaluation.max_samples=8", "cascade.teacher_prep_steps=[PT, FT]",
          "cascade.role_prep_steps={}"]
TUNE_SHRINK = [*SHRINK, "tune.num_samples=2", "tune.max_steps_per_trial=2"]
EXPERIMENT_SHRINK = SHRINK  # the table's teachers too: 2 + 2 steps


@dataclass(frozen=True)
class Run:
    """Run it in the copy, with `extra` appended; `expect` must be in its output, `files` must exist."""

    extra: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    as_run: str | None = None
    """The command as run, where the README's has placeholders or optional parts."""


@dataclass(frozen=True)
class Elsewhere:
    """Run in another form by `test` (a test file, or file::function), for `why`."""

    test: str
    why: str


@dataclass(frozen=True)
class InBlock:
    """Run with the rest of the README block of `section`, as one shell script, after the other
    commands (see `job_submit_script`)."""

    section: str


@dataclass(frozen=True)
class PythonBlock:
    """Run the block with `python -c`, its override list replaced by `overrides`."""

    overrides: tuple[str, ...] = field(default_factory=tuple)
    expect: tuple[str, ...] = ()


JOB_SUBMIT_SECTION = "`ray job submit`"
JOB_SUBMIT = "tests/reliability/test_cluster_job.py::test_job_on_two_nodes_logs_no_error_and_never_shows_its_s3_credentials"
CHECKS: dict[str, Run | Elsewhere | PythonBlock | InBlock] = {
    # Two commands
    "bash scripts/quickstart.sh": Run(tuple(f"--set {shlex.quote(s)}" for s in SHRINK), expect=("report: ", "student: "),
                                      files=("runs/tiny-cascade/report.md", "runs/tiny-cascade/step_phases.png")),
    "bash scripts/test.sh": Elsewhere(".ci/run", "it is this suite (CI runs it through .ci/run)"),
    "python: from ckd_ray import load_config, run_cascade": PythonBlock(tuple(SHRINK), expect=("runs/tiny-cascade/report.md",)),
    # Configs
    ".venv/bin/ckd-ray config check configs/tiny_cascade.yaml --set trainer.max_steps=20": Run(expect=("OK: job 'tiny-cascade'",)),
    ".venv/bin/ckd-ray config show configs/tiny_cascade.yaml": Run(expect=("name: tiny-cascade",)),
    # Commands
    "ckd-ray data build-kvqa data/kvqa": Run(files=("data/kvqa/instructions.json",)),
    "ckd-ray cascade configs/tiny_cascade.yaml": Run(tuple(f"--set {shlex.quote(s)}" for s in SHRINK), expect=("done in an earlier run, skipped",)),
    "ckd-ray eval configs/tiny_cascade.yaml": Run(tuple(f"--set {shlex.quote(s)}" for s in SHRINK),
                                                  expect=("scores: ", "| baseline: question-only |", "grounded")),
    "ckd-ray tune configs/tiny_tune.yaml [--run-best]": Run(
        tuple(f"--set {shlex.quote(s)}" for s in TUNE_SHRINK), as_run="ckd-ray tune configs/tiny_tune.yaml --run-best",
        expect=("best config", "running the same cascade with the untuned weights"), files=("runs/tiny-tune/tune/best_config.yaml",)),
    "ckd-ray tune configs/tiny_tune_weights.yaml --run-best": Elsewhere(
        "tests/test_tune_search.py::test_a_five_weight_search_over_the_hop_stages_writes_a_best_config_the_cascade_accepts",
        "the same config with small budgets (joint mode: one search); --run-best is the tiny_tune.yaml command's, run here"),
    "ckd-ray experiment configs/kvqa_table.yaml": Run(
        ("--seeds 0", *(f"--set {shlex.quote(s)}" for s in EXPERIMENT_SHRINK)), expect=("table: ",), files=("runs/kvqa-table/table.md",)),
    "ckd-ray models compose --llm DIR --vision DIR --out DIR": Elsewhere(
        "tests/test_models_compose.py::test_cli_compose_prints_the_summary_and_refuses_with_exit_code_2",
        "DIR stands for public checkpoints; the test composes tiny folders of the same layout"),
    "ckd-ray --help": Run(expect=("cascade", "tune", "experiment")),
    "ckd-ray models pretrain data/kvqa": Run(expect=("pretrained parts ready", "[cached]")),
    # `ray job submit`: the whole block, as one script, at the end of the README test
    "source .venv/bin/activate": InBlock(JOB_SUBMIT_SECTION),
    "export RAY_AUTH_MODE=token": InBlock(JOB_SUBMIT_SECTION),
    "ray start --head --num-cpus 8 --dashboard-host 127.0.0.1": InBlock(JOB_SUBMIT_SECTION),
    ("ray job submit --address http://127.0.0.1:8265 --working-dir .  --runtime-env jobs/runtime_env.yaml --  python "
     "jobs/cascade_job.py configs/tiny_cascade.yaml --paths-from $PWD --set name=tiny-cascade-job"): InBlock(JOB_SUBMIT_SECTION),
    "ray job logs --address http://127.0.0.1:8265 <submission id>": InBlock(JOB_SUBMIT_SECTION),
    ("ray job submit --address http://127.0.0.1:8265 --working-dir .  --runtime-env jobs/runtime_env.yaml --  python "
     "jobs/tune_job.py configs/tiny_tune.yaml --paths-from $PWD --set name=tiny-tune-job"): InBlock(JOB_SUBMIT_SECTION),
    "ray stop": InBlock(JOB_SUBMIT_SECTION),
    # On a GPU cluster
    "pip install torch --index-url https://download.pytorch.org/whl/cu124": Elsewhere(
        "scripts/setup.sh", "a CUDA wheel from the internet, for GPU nodes; the CPU install path is setup.sh"),
    "pip install -e .": Elsewhere("scripts/setup.sh", "setup.sh installs the package so (with the test extras)"),
    # From public checkpoints
    ("ckd-ray models compose --llm DIR_OR_S3 --vision DIR_OR_S3 --out DIR_OR_S3  [--connector mlp2x_gelu] "
     "[--vision-feature-layer -2] [--select-strategy default|full]"): Elsewhere(
        "tests/test_models_compose.py", "the synopsis; each option is tested on tiny folders"),
    "python: from PIL import Image": Elsewhere(
        "tests/test_models.py::test_saved_folder_answers_through_autoprocessor_and_pipeline_as_the_evaluation_does",
        "the same lines in a clean interpreter on a trained tiny student, answers compared with the evaluation's"),
    "python: from transformers import AutoProcessor, LlavaForConditionalGeneration": Elsewhere(
        "tests/test_models_compose.py::test_composed_qwen2_siglip_loads_with_transformers_and_answers",
        "the same loading and generate on a tiny composed folder (the README's needs public checkpoints)"),
    ("ckd-ray models compose --llm checkpoints/Qwen2.5-0.5B-Instruct --vision checkpoints/siglip-base-patch16-224  "
     "--out models/qwen2.5-0.5b-siglip-b16-224"): Elsewhere("tests/test_models_compose.py", "needs the public checkpoints"),
    ("ckd-ray models compose --llm checkpoints/Qwen2.5-1.5B-Instruct --vision checkpoints/siglip-base-patch16-224  "
     "--out models/qwen2.5-1.5b-siglip-b16-224"): Elsewhere("tests/test_models_compose.py", "needs the public checkpoints"),
    # What has never run on a GPU
    "bash benchmarks/gpu_smoke.sh": Elsewhere(
        "tests/test_benchmarks.py::test_gpu_smoke_refuses_without_cuda_and_its_dry_run_gives_the_real_shapes",
        "needs CUDA: the test checks its refusal without it, and its whole path at tiny shapes on CPU"),
    "python -m benchmarks.pools --gpu": Elsewhere(
        "tests/test_bench_pools.py::test_the_gpu_matrix_refuses_without_cuda_and_plans_real_widths",
        "needs CUDA: the test checks its refusal and plan; its matrix code runs in the CPU matrix's smoke test"),
    "ckd-ray config check configs/composed_quickstart.yaml": Elsewhere(
        "tests/test_models_compose.py::test_pair_checks_accept_padded_vocabularies_and_refuse_other_images_or_tokenizers",
        "its pair checks need the composed folders"),
}


def readme_blocks(text: str) -> list[tuple[str, str, str]]:
    """(section, language, code) of each fenced block, in order; an indented fence (in a list)
    loses its indentation."""
    section, blocks, lines, index = "", [], text.splitlines(), 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = re.match(r"(\s*)```(\w*)\s*$", line)
        if fence:
            indent, language, body = len(fence.group(1)), fence.group(2), []
            index += 1
            while not re.match(r"\s*```\s*$", lines[index]):
                body.append(lines[index][indent:] if not lines[index][:indent].strip() else lines[index])
                index += 1
            blocks.append((section, language, "\n".join(body)))
        index += 1
    return blocks


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(command, code) of every bash command (continuations joined, comments dropped) and every
    python block (keyed "python: <its first line>"), in README order."""
    found = []
    for _, language, code in readme_blocks(text):
        if language == "bash":
            for line in re.sub(r"\\\n\s*", " ", code).splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()
                if line and not line.startswith("#"):
                    found.append((line, line))
        elif language == "python":
            found.append((f"python: {code.splitlines()[0]}", code))
    return found


def test_every_readme_command_has_a_check():
    commands = [command for command, _ in readme_commands((REPO / "README.md").read_text())]
    missing = [command for command in commands if command not in CHECKS]
    assert not missing, "README commands without a check in tests/test_readme.py CHECKS:\n" + "\n".join(missing)
    stale = sorted(set(CHECKS) - set(commands))
    assert not stale, "CHECKS entries no longer in the README:\n" + "\n".join(stale)
    for command, check in CHECKS.items():
        if isinstance(check, Elsewhere):
            path, _, function = check.test.partition("::")
            assert (REPO / path).exists(), f"{command!r}: {path} does not exist"
            if function:
                assert f"def {function}(" in (REPO / path).read_text(), f"{command!r}: {check.test} does not exist"


def figures_rows(text: str) -> list[dict[str, str]]:
    """The rows of the README's Figures table, each as {column: cell}."""
    section = text.split("\n## Figures\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_every_figures_row_names_its_command_date_and_commit():
    """A figure without the command that printed it cannot be re-measured, nor checked against
    what the command prints today; the date and commit say how old it is."""
    rows = figures_rows((REPO / "README.md").read_text())
    assert len(rows) >= 5 and set(rows[0]) == {"what", "command", "figure", "measured"}, rows[:1]
    problems = []
    for row in rows:
        command = re.fullmatch(r"`([^`]+)`", row.get("command", ""))
        if not command:
            problems.append(f"{row['what']!r}: no command (one `command` in backticks)")
            continue
        words = command.group(1).split()
        script = words[1] if words[0] in ("bash", "python") and words[1] != "-m" else None
        if words[:2] == ["python", "-m"]:
            script = words[2].replace(".", "/")
        if script and not (REPO / script).exists() and not (REPO / f"{script}.py").exists():
            problems.append(f"{row['what']!r}: {script} does not exist")
        if not re.fullmatch(r"20\d\d-\d\d-\d\d, [0-9a-f]{7,40}", row.get("measured", "")):
            problems.append(f"{row['what']!r}: measured {row.get('measured')!r} is not 'YYYY-MM-DD, <commit>'")
        if not row.get("figure"):
            problems.append(f"{row['what']!r}: no figure")
    assert not problems, "README Figures rows:\n" + "\n".join(problems)


def _fresh_copy(destination: Path) -> Path:
    """The repository's tracked and unignored files, as a clone with the working tree's changes
    would have them; `.venv` is this test run's environment (a link), so setup finds it installed."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    (destination / ".venv").symlink_to(Path(sys.prefix))
    return destination


def _setup_is_current() -> bool:
    """What scripts/setup.sh checks: the environment was installed from this pyproject.toml and
    these constraints (else setup in the copy would reinstall the package from the copy)."""
    import hashlib

    stamp = Path(sys.prefix) / ".ckd_ray-installed"
    want = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / "constraints" / "cpu.txt").read_bytes()).hexdigest()[:16]
    return stamp.exists() and stamp.read_text().strip() == want


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.readme
@pytest.mark.timeout(2400)  # every README command in turn: about 13 min on 2 cores
def test_readme_commands_run_as_written(tmp_path):
    if not _setup_is_current():
        pytest.fail("the environment is older than pyproject.toml: run `bash scripts/setup.sh` first (as scripts/test.sh does)")
    copy = _fresh_copy(tmp_path / "ckd_ray")
    # As after `source .venv/bin/activate`, which the README's commands assume.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "PATH": f"{copy / '.venv' / 'bin'}:{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(copy / ".venv")}
    commands = dict(readme_commands((REPO / "README.md").read_text()))
    # README order, except that the data is built before the quickstart would build it itself.
    order = sorted(commands, key=lambda command: (command != "ckd-ray data build-kvqa data/kvqa", list(commands).index(command)))
    ran = []
    for command in order:
        check = CHECKS[command]
        if isinstance(check, (Elsewhere, InBlock)):
            continue
        if isinstance(check, PythonBlock):
            code = re.sub(r'\["trainer\.max_steps=20"\]', repr(list(check.overrides)), commands[command])
            assert code != commands[command], "the Python block's override list changed: update PythonBlock"
            argv = [sys.executable, "-c", code]
            shown = command
        else:
            shown = " ".join([check.as_run or command, *check.extra])
            argv = ["bash", "-c", shown]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True, timeout=900)
        print(f"{time.monotonic() - started:6.1f} s  {shown}")
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"README command failed: {shown}\n{output[-4000:]}"
        for text in check.expect:
            assert text in output, f"{shown}: {text!r} not in its output\n{output[-3000:]}"
        for name in getattr(check, "files", ()):
            assert (copy / name).exists(), f"{shown}: {name} was not written"
        ran.append(shown)
    assert len(ran) >= 9, ran
    _run_job_submit_block(copy, env)


def job_submit_script(code: str, ports: dict[str, int], temp_dir: str, shrink: list[str], log: str = "/tmp/submitted.log") -> str:
    """The README's `ray job submit` block as a script that runs beside the test session's own
    Ray: the head gets free ports and a temp folder of its own (appended to `ray start`, and the
    job API's port replaces 8265), each submitted job's budgets are shrunk by `--set`, the
    submission id `ray job submit` printed (kept in `log`, outside the working directory, which
    must not change while Ray packages it) fills `<submission id>`, and `ray stop` (which would
    end every Ray of the machine) is left to the test, which stops the head's processes."""
    lines = ["set -euo pipefail"]
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if not line or line.startswith("#") or line == "ray stop":
            continue
        line = line.replace("http://127.0.0.1:8265", dashboard)
        if line.startswith("ray start --head"):
            line += f" --port {ports['gcs']} --dashboard-port {ports['dashboard']} --ray-client-server-port {ports['client']}"
            line += f" --node-ip-address 127.0.0.1 --temp-dir {temp_dir} --disable-usage-stats"
            line += "".join(f" --{name} {port}" for name, port in ports.items() if name not in ("gcs", "dashboard", "client"))
        if line.startswith("ray job submit"):
            line += "".join(f" --set {shlex.quote(s)}" for s in shrink) + f" 2>&1 | tee -a {shlex.quote(log)}"
        line = line.replace("<submission id>", f"\"$(grep -o 'raysubmit_[A-Za-z0-9]*' {shlex.quote(log)} | tail -1)\"")
        lines.append(line)
    return "\n".join(lines) + "\n"


def _run_job_submit_block(copy: Path, env: dict) -> None:
    import importlib.util

    # tests/conftest.py by its path: in a full session `conftest` may name tests/reliability/conftest.py.
    spec = importlib.util.spec_from_file_location("ckd_ray_tests_conftest", REPO / "tests" / "conftest.py")
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    RayCluster, _free_ports = shared.RayCluster, shared._free_ports

    code = next(code for section, language, code in readme_blocks((REPO / "README.md").read_text())
                if section == JOB_SUBMIT_SECTION and language == "bash")
    names = ["gcs", "dashboard", "client", "node-manager-port", "object-manager-port", "metrics-export-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port"]
    cluster = RayCluster(env)  # only for its temp folder and `stop`, which ends the processes that name it
    script = job_submit_script(code, dict(zip(names, _free_ports(len(names)))), cluster.temp_dir, TUNE_SHRINK,
                               log=str(copy.parent / "submitted.log"))
    started = time.monotonic()
    try:
        done = subprocess.run(["bash", "-c", script], cwd=copy, env={**env, "VIRTUAL_ENV": ""}, capture_output=True, text=True,
                              timeout=1200)
    finally:
        cluster.stop()
    print(f"{time.monotonic() - started:6.1f} s  the `ray job submit` block")
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"the README's `ray job submit` block failed:\n{script}\n{output[-5000:]}"
    assert output.count("succeeded") >= 2, output[-4000:]  # both submitted jobs
    assert "report: " in output and "best config" in output, output[-4000:]
    assert "teacher prepared by an earlier run" in output, output[-4000:]  # the quickstart's, found by content


def test_the_job_submit_block_becomes_a_script_on_its_own_ports():
    code = next(code for section, language, code in readme_blocks((REPO / "README.md").read_text())
                if section == JOB_SUBMIT_SECTION and language == "bash")
    ports = {"gcs": 1, "dashboard": 2, "client": 3, "node-manager-port": 4}
    script = job_submit_script(code, ports, "/tmp/x", ["trainer.max_steps=2", "cascade.teacher_prep_steps=[PT, FT]"])
    assert "8265" not in script and "ray stop" not in script and "<submission id>" not in script
    assert "ray start --head --num-cpus 8 --dashboard-host 127.0.0.1 --port 1 --dashboard-port 2" in script
    assert "--temp-dir /tmp/x" in script and "--node-manager-port 4" in script
    submits = [line for line in script.splitlines() if line.startswith("ray job submit")]
    assert len(submits) == 2 and all("--set 'cascade.teacher_prep_steps=[PT, FT]'" in line for line in submits)
    assert "jobs/tune_job.py configs/tiny_tune.yaml" in submits[1]
