"""evomerge on a real multi-node Ray cluster with token authentication (issue #15).

One cluster for the module (``cluster_fixtures``): a head with no CPUs (it hosts the
dashboard for the Jobs API and no actor) and two 1-CPU worker nodes, every node a
``ray start --block`` subprocess with its own ports and temp dir, stopped by killing
its process group. Drivers are real ``evomerge`` subprocesses joined with ``--address``
(or submitted as Ray Jobs). The tests share the cluster and run in file order: the last
one kills every worker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cluster_fixtures import TOKEN, RAY, LocalCluster, cluster_env, new_cluster
from search_fixtures import records, search_config, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c = new_cluster(head_cpus=0)
    try:
        c.start_head()
        c.start_worker("w1")
        c.start_worker("w2")
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.temp_dir, ignore_errors=True)


def driver_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A driver with the token in RAY_AUTH_TOKEN but RAY_AUTH_MODE unset: the case of the issue."""
    env = cluster_env()
    env.pop("RAY_AUTH_MODE")
    return {**env, **extra}


def start_search(cfg_path: Path, address: str, env: dict[str, str], log: Path, *more: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(cfg_path), "--address", address,
                             "--no-progress", *more], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(pred: Any, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited {proc.returncode} waiting for {what}: "
                                 f"{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def per_actor(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "memory_plan.json").read_text()).get("per_actor") or {}
    except (OSError, ValueError):
        return {}


def check_lossless(run_dir: Path, budget: int) -> dict[str, dict[str, Any]]:
    evals = records(run_dir)
    assert len(evals) == budget, len(evals)
    assert sorted(r["index"] for r in evals) == list(range(budget))
    assert len({r["id"] for r in evals}) == budget
    return {r["id"]: r for r in evals}


def test_driver_without_token_is_one_line(cluster: LocalCluster, tiny_models, tmp_path):
    cfg = write_config(search_config(tiny_models, tmp_path, run_dir=tmp_path / "run"), tmp_path / "cfg.yaml")
    home = tmp_path / "home"
    home.mkdir()
    env = cluster_env(token=None)
    env["HOME"] = str(home)  # no ~/.ray/auth_token either
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--address", cluster.address,
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert cluster.address in errors[0] and "RAY_AUTH_TOKEN" in errors[0] and "no token" in errors[0]


def test_actors_spread_node_lost_and_regained(cluster: LocalCluster, tiny_models, tmp_path):
    budget = 36
    run_dir, announce = tmp_path / "run", tmp_path / "announce"
    announce.mkdir()
    faults = {"announce": str(announce), "sleep": {f"e{i:06d}": 1.0 for i in range(budget)}}
    cfg = search_config(tiny_models, tmp_path, run_dir=run_dir, evaluations=budget,
                        ray={"actors": None, "num_cpus_per_actor": 1, "max_restarts": 5},
                        output={"checkpoint_every": 5}, evaluation={"rescore_heldout": False})
    path = write_config(cfg, tmp_path / "cfg.yaml")
    log = tmp_path / "driver.out"
    proc = start_search(path, cluster.address, driver_env(tmp_path, EVOMERGE_TEST_FAULTS=json.dumps(faults)), log)
    try:
        # default pool: one actor per CPU of the cluster, spread: one on each worker node
        actors = wait_for(lambda: len(per_actor(run_dir)) == 2 and per_actor(run_dir), 120, "two actors", proc, log)
        assert len({a["node_id"] for a in actors.values()}) == 2, actors
        on_w2 = next(a for a in actors.values() if cluster.node_of(int(a["pid"])) is cluster.nodes["w2"])
        # the moment w2's actor starts a (non-first) candidate, the node dies
        seen = {p.name for p in announce.iterdir()}

        def started_on_w2() -> str | None:  # a candidate that started on w2 in the last 0.3 s (1 s long)
            for p in announce.iterdir():
                if (p.name not in seen and time.time() - p.stat().st_mtime < 0.3
                        and p.read_text().strip() == str(on_w2["pid"])):
                    return p.stem
            return None

        killed = wait_for(started_on_w2, 60, "a candidate on w2", proc, log)
        cluster.nodes["w2"].kill()
        t_kill = time.time()
        # the node comes back (a new raylet): the pool grows back to two actors on two nodes
        time.sleep(2.0)
        cluster.start_worker("w2")
        wait_for(lambda: len({a["node_id"] for a in per_actor(run_dir).values()}) == 2
                 and on_w2["node_id"] not in {a["node_id"] for a in per_actor(run_dir).values()},
                 120, "the pool back to two actors", proc, log)
        assert proc.wait(240) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    evals = check_lossless(run_dir, budget)
    assert all(r["status"] == "ok" for r in evals.values()), [r["error"] for r in evals.values() if r["error"]]
    rec = evals[killed]
    assert rec["attempts"] == 2, (killed, [ln for ln in (run_dir / "driver.log").read_text().splitlines() if "died" in ln])
    redispatch = rec["finished_at"] - rec["timings"]["wall_s"] - t_kill
    print(f"\nnode death -> re-dispatch of {killed}: {redispatch:.2f}s")
    assert redispatch < 30
    driver_log = (run_dir / "driver.log").read_text()
    assert driver_log.count("re-queueing it") == 1


def test_source_missing_on_one_node(cluster: LocalCluster, tiny_models, tmp_path):
    """Sources named ``~/models/...``: present under the driver's and w1's HOME, absent on w2's."""
    home, other = tmp_path / "home", tmp_path / "other"
    (home / "models").mkdir(parents=True)
    other.mkdir()
    for ref in [tiny_models.base_ref, *tiny_models.source_refs[:2]]:
        shutil.copytree(ref, home / "models" / Path(ref).name)

    def tilde(ref: str) -> str:
        return f"~/models/{Path(ref).name}"

    cluster.nodes["w1"].kill()
    cluster.start_worker("w1", home=str(home))
    cluster.nodes["w2"].kill()
    cluster.start_worker("w2", home=str(other))
    try:
        budget = 6
        run_dir = tmp_path / "run"
        cfg = search_config(tiny_models, tmp_path, run_dir=run_dir, evaluations=budget,
                            ray={"actors": 2, "num_cpus_per_actor": 1}, evaluation={"rescore_heldout": False})
        cfg["models"] = {"base": tilde(tiny_models.base_ref), "sources": [tilde(r) for r in tiny_models.source_refs[:2]]}
        path = write_config(cfg, tmp_path / "cfg.yaml")
        log = tmp_path / "driver.out"
        proc = start_search(path, cluster.address, driver_env(tmp_path, HOME=str(home)), log)
        assert proc.wait(180) == 0, log.read_text()[-3000:]
        check_lossless(run_dir, budget)
        lines = [ln for ln in (run_dir / "driver.log").read_text().splitlines() if "actor" in ln and "on node" in ln
                 and "ERROR" in ln]
        assert len(lines) == 1 and ("~/models/" in lines[0] or str(other) in lines[0]), lines
        assert "on node " in lines[0] and "Traceback" not in lines[0]
        # the actor on w1 did the whole search
        assert len({r["actor"] for r in records(run_dir)} - {None}) == 1
    finally:
        for name in ("w1", "w2"):
            cluster.nodes[name].kill()
            cluster.start_worker(name)


def job(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", args[0], "--address", cluster.dashboard_url, *args[1:]], env=cluster_env(),
                          capture_output=True, text=True, timeout=120)


def job_status(cluster: LocalCluster, job_id: str) -> str:
    res = job(cluster, "status", job_id)
    out = res.stdout + res.stderr  # Ray's CLI logger writes the status line to stderr
    for status, words in (("SUCCEEDED", "succeeded"), ("STOPPED", "was stopped"), ("FAILED", "failed"),
                          ("RUNNING", "running"), ("PENDING", "pending")):
        if status in out or words in out.lower():
            return status
    return "?"


def test_ray_job_stop_checkpoints_and_resume_job_continues(cluster: LocalCluster, tiny_models, tmp_path):
    budget = 16
    run_dir = tmp_path / "run"
    faults = {"sleep": {f"e{i:06d}": 0.5 for i in range(budget)}}
    cfg = search_config(tiny_models, tmp_path, run_dir=run_dir, evaluations=budget,
                        ray={"actors": 2, "num_cpus_per_actor": 1}, output={"checkpoint_every": 100},
                        evaluation={"rescore_heldout": False})
    path = write_config(cfg, tmp_path / "cfg.yaml")
    py = sys.executable
    env_json = json.dumps({"env_vars": {"EVOMERGE_TEST_FAULTS": json.dumps(faults)}})
    out = job(cluster, "submit", "--no-wait", "--submission-id", f"search-{os.getpid()}", "--runtime-env-json",
              env_json, "--", py, "-m", "evomerge.cli", "search", str(path), "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    first = f"search-{os.getpid()}"
    wait_for(lambda: len(records(run_dir)) >= 4, 120, "4 evaluations in the first job")
    assert job(cluster, "stop", first).returncode == 0
    try:
        wait_for(lambda: job_status(cluster, first) == "STOPPED", 60, "the job to stop")
    except AssertionError:
        res = job(cluster, "logs", first)
        raise AssertionError(job(cluster, "status", first).stderr[-1000:] + res.stdout[-3000:]) from None
    counters = json.loads((run_dir / "state" / "counters.json").read_text())
    assert counters["status"] == "interrupted", counters
    before = records(run_dir)
    assert 4 <= len(before) < budget
    second = f"resume-{os.getpid()}"
    out = job(cluster, "submit", "--submission-id", second, "--runtime-env-json", env_json, "--",
              py, "-m", "evomerge.cli", "resume", str(run_dir), "--no-progress")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert job_status(cluster, second) == "SUCCEEDED"
    after = records(run_dir)
    assert after[: len(before)] == before  # nothing logged before was touched
    check_lossless(run_dir, budget)


def test_every_worker_gone_checkpoints_and_exits(cluster: LocalCluster, tiny_models, tmp_path):
    budget, wait_s = 40, 6.0
    run_dir = tmp_path / "run"
    faults = {"sleep": {f"e{i:06d}": 0.5 for i in range(budget)}}
    cfg = search_config(tiny_models, tmp_path, run_dir=run_dir, evaluations=budget,
                        ray={"actors": 2, "num_cpus_per_actor": 1, "capacity_wait_s": wait_s},
                        output={"checkpoint_every": 100}, evaluation={"rescore_heldout": False})
    path = write_config(cfg, tmp_path / "cfg.yaml")
    log = tmp_path / "driver.out"
    proc = start_search(path, cluster.address, driver_env(tmp_path, EVOMERGE_TEST_FAULTS=json.dumps(faults)), log)
    try:
        wait_for(lambda: len(records(run_dir)) >= 3, 120, "3 evaluations", proc, log)
        t0 = time.monotonic()
        cluster.nodes["w1"].kill()
        cluster.nodes["w2"].kill()
        rc = proc.wait(120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 2, text[-3000:]
    errors = [ln for ln in text.splitlines() if ln.startswith("evomerge search: error:")]
    assert len(errors) == 1 and "ray.capacity_wait_s" in errors[0] and "evomerge resume" in errors[0], text[-3000:]
    assert "Traceback" not in text
    assert wait_s <= took < wait_s + 45, took
    counters = json.loads((run_dir / "state" / "counters.json").read_text())
    assert counters["status"] == "interrupted" and counters["evaluations"] == len(records(run_dir))
    assert TOKEN not in text and TOKEN not in (run_dir / "driver.log").read_text()


def test_kuberay_rayjob_manifest_has_the_fields_kuberay_requires():
    """Not run here (no Kubernetes), but valid YAML with what KubeRay's RayJob CRD requires."""
    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "kuberay_rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("evomerge search ")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict) and head["template"]["spec"]["containers"]
    groups = cluster["workerGroupSpecs"]
    assert groups and all(g["groupName"] and isinstance(g["rayStartParams"], dict)
                          and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
                          and g["template"]["spec"]["containers"] for g in groups)
    for container in [*head["template"]["spec"]["containers"],
                      *(c for g in groups for c in g["template"]["spec"]["containers"])]:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]  # the token is never written in the file
        assert container["image"] and container["name"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in groups for c in g["template"]["spec"]["containers"])


def test_connection_errors_are_one_line_with_cause_and_fix(tmp_path, monkeypatch):
    """The three ways a join fails, as the driver words them (no cluster needed; the real
    no-token join is ``test_driver_without_token_is_one_line``)."""
    from ray.exceptions import AuthenticationError

    from evomerge.search.ray_cluster import connection_error_line, enable_token_auth, token_source

    def chained(inner: BaseException) -> ConnectionError:
        try:
            try:
                raise inner
            except BaseException as err:
                raise ConnectionError("Failed to connect to Ray cluster") from err
        except ConnectionError as outer:
            return outer

    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    assert token_source() is None and enable_token_auth() is None and "RAY_AUTH_MODE" not in os.environ
    auth = chained(AuthenticationError("RPC error: InvalidAuthToken"))
    no_token = connection_error_line("10.0.0.1:6379", auth, None)
    wrong = connection_error_line("10.0.0.1:6379", auth, "RAY_AUTH_TOKEN")
    nothing = connection_error_line("10.0.0.1:6379", ConnectionError("timed out"), None)
    for line in (no_token, wrong, nothing):
        assert "\n" not in line and "10.0.0.1:6379" in line
    assert "no token" in no_token and "RAY_AUTH_TOKEN" in no_token
    assert "rejected the token from RAY_AUTH_TOKEN" in wrong
    assert "nothing answered" in nothing and "ray start --head" in nothing
    # a token file turns token auth on for the driver; the token is named by its source only
    token_file = tmp_path / "tok"
    token_file.write_text(TOKEN)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    source = enable_token_auth()
    assert source == f"RAY_AUTH_TOKEN_PATH={token_file}" and os.environ["RAY_AUTH_MODE"] == "token"
    assert TOKEN not in source
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # an explicit mode is respected
    assert enable_token_auth() == source and os.environ["RAY_AUTH_MODE"] == "disabled"


def test_default_actor_count_and_placement(monkeypatch):
    """Unset ``ray.actors``: one per num_cpus_per_actor CPUs of a joined cluster, 1 embedded."""
    import ray

    from evomerge.config import SearchConfig
    from evomerge.search import ray_cluster
    from evomerge.search.actor import actor_options

    data = {"models": {"sources": ["a", "b"]}, "objectives": [{"name": "p", "evaluator": "perplexity",
                                                                "files": ["x"]}], "budget": {"evaluations": 2}}
    cfg = SearchConfig.model_validate({**data, "ray": {"num_cpus_per_actor": 2}})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 9.0})
    monkeypatch.setattr(ray_cluster, "_embedded", False)
    assert ray_cluster.plan_actors(cfg) == (4, False)
    monkeypatch.setattr(ray_cluster, "_embedded", True)
    assert ray_cluster.plan_actors(cfg) == (1, False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 3.0})
    assert ray_cluster.plan_actors(cfg) == (3, True)
    assert actor_options(cfg, False)["scheduling_strategy"] == "SPREAD"
    packed = SearchConfig.model_validate({**data, "ray": {"placement": "pack"}})
    assert "scheduling_strategy" not in actor_options(packed, False)
