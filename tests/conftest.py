"""Shared fixtures: a session-scoped local Ray sized for a 2-core machine, a real S3 endpoint
(moto's server) on loopback, the bundled benchmark built once, and the tiny model presets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

# Keep tests quiet and offline whatever the caller's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No Ray call in a test may connect Ray by itself: Ray's implicit `ray.init()` joins whatever
# cluster its address file names, and retries a dead one for minutes. Read when Ray is imported,
# so set before any test imports it; a test that touches Ray without a Ray fixture fails at once.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"


RAY_FIXTURES = {"ray_local", "s3_for_workers"}
# Tests that start Ray processes of their own (`ray start` clusters, `ckd-ray` subprocesses with a
# local Ray, a driver program for Prometheus to scrape) rather than use the session's `ray_local`.
OWN_RAY_FIXTURES = {"ray_cluster", "ray_head", "scraped_run", "metrics_workload"}
OWN_RAY_TESTS = {"test_killed_cascade_resumes_at_the_step_it_was_in", "test_readme_commands_run_as_written",
                 "test_a_stale_address_file_of_a_dead_head_neither_hangs_nor_is_joined",
                 "test_a_short_cascade_from_the_parts_answers_hop0_questions_better_than_question_only",
                 "test_fused_step_trains_from_both_cached_passes_and_reports_each_teachers_weight"}


def _starts_its_own_ray(item) -> bool:
    return bool(OWN_RAY_FIXTURES & set(getattr(item, "fixturenames", ()))) or getattr(item, "originalname", "") in OWN_RAY_TESTS


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group into the node id
def pytest_collection_modifyitems(items):
    """With `-n 2` (scripts/test.sh), the Ray tests go to two xdist groups, one per worker, each
    run one at a time: "ray" (the tests on the session's `ray_local`) and "own-ray" (tests that
    start Ray processes of their own), with the tests that use no Ray spread beside them. The
    session's Ray runs at a lower CPU priority (`ray_local`), so a Ray process starting in the
    other group is never starved past Ray's fixed 30 s raylet registration wait ("The current
    node timed out during startup")."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if _starts_its_own_ray(item):
            item.add_marker(pytest.mark.xdist_group("own-ray"))
        elif item.get_closest_marker("ray") or RAY_FIXTURES & fixtures:
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Under `--dist loadgroup`, xdist has marked each grouped test by suffixing its node id with
    `@<group>` by now; without it the scheduler spreads the Ray tests over both workers, and the
    suite slows down (two Ray clusters on 2 cores) and can fail a raylet's startup. Refuse to run
    that way (pytest 9.2 moved node ids where pytest-xdist 3.8 cannot suffix them)."""
    config = session.config
    if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
        return
    ungrouped = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if ungrouped:
        raise pytest.UsageError(
            f"pytest-xdist did not group {len(ungrouped)} Ray tests (e.g. {ungrouped[0]}): this pytest "
            f"({pytest.__version__}) and pytest-xdist do not work together for --dist loadgroup; install the "
            "versions pyproject.toml pins (bash scripts/setup.sh)"
        )


# Every port this test process has handed out: a port drawn for one server is never drawn again
# for another, even after the socket that found it free is closed.
_TAKEN: set[int] = set()


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1, none handed out before in this process. The
    sockets stay bound until all are picked, so the kernel cannot return the same port twice."""
    socks, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
            port = sock.getsockname()[1]
            if port not in _TAKEN:
                ports.append(port)
                _TAKEN.add(port)
    finally:
        for sock in socks:
            sock.close()
    return ports


def _free_port() -> int:
    return _free_ports(1)[0]


@pytest.fixture(scope="session")
def free_ports():
    """`free_ports(n)`: n distinct free ports for servers a test starts, never handed out twice."""
    return _free_ports


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto in server mode, in its own process on 127.0.0.1. Sets the AWS_*
    environment for boto3 and pyarrow (and for Ray workers, which inherit it) and yields the URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto S3 server did not start within 30 s")
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    name = "ckd-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


# This Ray runs without a dashboard, so its State API has no server of its own, and Ray's client
# then asks http://127.0.0.1:8265, where the dashboard of another test's Ray (a `ckd-ray` command,
# a `ray start` head) may be listening. That one answers "no such actor" about this Ray's Train
# controller, and Ray Train's placement-group cleaner, which polls the State API to see whether
# its controller still lives, takes that for a death and removes the running worker group's
# placement group: a worker group failure no test caused (it spent a test's `max_failures=1`
# before its injected kill). Its workers are pointed at a loopback port that is bound and never
# listened on, so every query is refused and the cleaner keeps waiting, as it does when the
# State API is down.
_NOWHERE = socket.socket()
_NOWHERE.bind(("127.0.0.1", 0))
_STATE_API_NOWHERE = f"http://127.0.0.1:{_NOWHERE.getsockname()[1]}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session. More logical CPUs than the machine's 2 cores, so a
    pipeline with a teacher pool and 2 Train workers is not starved of CPU slots. It starts
    after the S3 server, so Ray's workers inherit the endpoint and credentials."""
    import ray

    if not ray.is_initialized():
        # Raised before Ray starts (its processes take the environment then): Ray Train's 60 s
        # worker-group start wait, on a core the other group is busy with (see below).
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
        # address="local": a new Ray, never the one (live or dead) that Ray's address file names.
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": _STATE_API_NOWHERE}})
        _lower_priority_of_this_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _ray_of_a_ray_test(request):
    """A test marked `ray` that starts no Ray of its own runs on the session's `ray_local`, whether
    it names the fixture or not: it is connected before the test body runs, explicitly."""
    if request.node.get_closest_marker("ray") and not _starts_its_own_ray(request.node):
        request.getfixturevalue("ray_local")


def _worker_port_range(width: int = 200) -> tuple[int, int]:
    """(min, max) of `width` + 1 consecutive ports for a node's workers, below the kernel's
    ephemeral range (where `_free_ports` draws), all free now and none handed out before."""
    for low in range(20000, 32000, width + 1):
        span = range(low, low + width + 1)
        if _TAKEN.isdisjoint(span) and all(_bindable(port) for port in span):
            _TAKEN.update(span)
            return low, low + width
    raise RuntimeError("no free range of worker ports in 20000-32000")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _lower_priority_of_this_ray(niceness: int = 10) -> None:
    """Started at normal priority (its raylet had to register in 30 s), the session's Ray then
    yields the CPU to the "own-ray" group's starting processes: this process and every Ray
    process it started (workers the raylet forks later inherit the raylet's niceness)."""
    import psutil

    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            process.nice(max(process.nice(), niceness))
        except psutil.Error:
            continue


class RayCluster:
    """A real Ray cluster of `ray start` processes on loopback: a head, then any nodes joined to it
    with `ray start --address`, each with its own ports, all in one temp folder (socket paths
    must stay short). `stop` ends only this cluster's processes (their command lines name its
    temp folder): `ray stop` would end every Ray cluster of the machine, the test session's too."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.temp_dir = f"/tmp/ckd-ray-{os.getpid()}-{_free_port()}"
        self.gcs = self.dashboard = None

    def _start(self, args: list[str]) -> None:
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
        ports = ["--node-ip-address", "127.0.0.1", "--temp-dir", self.temp_dir, "--disable-usage-stats"]
        for name, port in zip(names, _free_ports(len(names))):
            ports += [name, str(port)]
        # Started with SIGINT ignored, as `ray start ... &` in a script (or a CI runner) leaves it: Ray's
        # processes inherit that, the harsher case for the task cancellation at the end of a pass.
        done = subprocess.run([ray, "start", *args, *ports], env=self.env, capture_output=True, text=True, timeout=300,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        if done.returncode:
            raise RuntimeError(f"`ray start {' '.join(args + ports)}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def start_head(self, num_cpus: int, resources: dict | None = None) -> str:
        """Starts the head (dashboard and job API on 127.0.0.1); returns the job API's address."""
        import json

        self.gcs, dashboard, client = _free_ports(3)
        self._start(["--head", "--port", str(self.gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                     "--include-dashboard", "true", "--ray-client-server-port", str(client),
                     "--num-cpus", str(num_cpus), "--resources", json.dumps(resources or {})])
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        return self.dashboard

    def add_node(self, num_cpus: int, resources: dict | None = None) -> None:
        """Joins one more node (a raylet with its own resources) to the head."""
        import json

        low, high = _worker_port_range()
        self._start(["--address", f"127.0.0.1:{self.gcs}", "--num-cpus", str(num_cpus), "--resources", json.dumps(resources or {}),
                     "--min-worker-port", str(low), "--max-worker-port", str(high)])

    def processes(self) -> list:
        """This cluster's processes: those whose command line names its temp folder, and those
        that renamed themselves (`ray::DashboardAgent`, the client server) but keep a file open
        in it (their logs). Left running, the agents retry the dead head for minutes, on CPU."""
        import psutil

        found = []
        for process in psutil.process_iter(["cmdline"]):
            try:
                if process.pid != os.getpid() and self.temp_dir in " ".join(process.info["cmdline"] or ()) or any(
                        f.path.startswith(self.temp_dir) for f in process.open_files()):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def stop(self) -> None:
        import psutil

        for sig in (signal.SIGTERM, signal.SIGKILL):
            processes = self.processes()
            for process in processes:
                try:
                    process.send_signal(sig)
                except psutil.Error:
                    continue
            psutil.wait_procs(processes, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_cluster():
    """A `RayCluster` to start; stopped after the test. As after `source .venv/bin/activate`, the
    environment's python (the one with the dependencies) is first on PATH, so a submitted job's
    `python` is it; Ray's token authentication is on, as a cluster should run it."""
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    cluster = RayCluster(env)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def random_preset_models():
    """The `models:` section that puts every role of a config extending configs/tiny_cascade.yaml
    (composed from pretrained parts, which a fresh clone has not built) back on the random-weight
    presets: the tests of the machinery need neither the parts nor their minutes."""
    return {role: {"preset": f"tiny-{role}", "path": None, "prepare": None} for role in ("student", "ta", "teacher")}


@pytest.fixture(scope="session")
def kvqa_dir(tmp_path_factory):
    """The bundled digits knowledge-VQA benchmark, built once per session."""
    from ckd_ray.data.kvqa import build_kvqa

    out = tmp_path_factory.mktemp("kvqa")
    build_kvqa(out, seed=0)
    return out
