"""The multi-host launchers (TPU pod over gcloud, SLURM, GKE JobSet), run against fakes.

Nothing here needs JAX, network, gcloud or a cluster: tpu_pod.sh runs with a fake `gcloud`
first on PATH that "is" one TPU worker (scp copies into a fake home, ssh runs the command
with bash there), slurm.sbatch runs under bash with fake `srun`/`scontrol`, and
gke_jobset.py's YAML is parsed back with yaml.safe_load.
"""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TPU_POD = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "slurm.sbatch"
GKE = ROOT / "launch" / "gke_jobset.py"
# A binding with quotes and spaces (and a shell metacharacter) must arrive unchanged.
TRICKY = ["--gin", "TrainConfig.run_name='my run; $HOME'", "--gin", 'Llama.name="a b"']


def script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def records(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------- tpu_pod.sh

# gcloud as seen from one TPU worker: logs argv; scp copies LOCAL to $FAKE_HOME/REMOTE; ssh
# runs --command with bash in $FAKE_HOME (exit 255 instead, without running, for the
# 1-based run-ssh numbers in FAKE_DROP); describe prints the next state of FAKE_STATES.
FAKE_GCLOUD = r'''
import json, os, shutil, subprocess, sys
d = os.environ["FAKE_DIR"]; argv = sys.argv[1:]
with open(os.path.join(d, "gcloud.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
def bump(name):
    p = os.path.join(d, name); n = int(open(p).read()) + 1 if os.path.exists(p) else 1
    open(p, "w").write(str(n)); return n
home = os.environ["FAKE_HOME"]
verb = argv[3]
if verb == "scp":
    shutil.copy(argv[4], os.path.join(home, argv[5].split(":", 1)[1]))
elif verb == "ssh":
    cmd = argv[argv.index("--command") + 1]
    drop = [int(x) for x in os.environ.get("FAKE_DROP", "").split(",") if x]
    if "jalign train" in cmd and bump("runs") in drop:
        sys.exit(255)
    sys.exit(subprocess.run(["bash", "-c", cmd], cwd=home, env={**os.environ, "HOME": home}).returncode)
elif verb == "describe":
    states = os.environ.get("FAKE_STATES", "READY").split(",")
    print(states[min(bump("describes"), len(states)) - 1])
'''
# The worker's interpreter: `-m venv .venv` makes a .venv whose pip logs its argv and
# whose jalign logs argv + JALIGN_* env and exits with the next code of FAKE_RCS.
FAKE_PYTHON = r'''
import os, shutil, sys, stat
assert sys.argv[1:] == ["-m", "venv", ".venv"], sys.argv
os.makedirs(".venv/bin", exist_ok=True)
d = os.environ["FAKE_DIR"]
open(".venv/bin/pip", "w").write("#!/bin/sh\necho \"$@\" >> %s/pip.log\n" % d)
shutil.copy(os.path.join(d, "jalign"), ".venv/bin/jalign")
for f in ("pip", "jalign"):
    os.chmod(".venv/bin/" + f, 0o755)
'''
FAKE_JALIGN = r'''
import json, os, sys
d = os.environ["FAKE_DIR"]; p = os.path.join(d, "jalign.jsonl")
n = len(open(p).readlines()) if os.path.exists(p) else 0
with open(p, "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                        "env": {k: v for k, v in os.environ.items() if k.startswith("JALIGN")}}) + "\n")
rcs = os.environ.get("FAKE_RCS", "0").split(",")
sys.exit(int(rcs[min(n, len(rcs) - 1)]))
'''


@pytest.fixture
def tpu_env(tmp_path):
    """A tiny git checkout to copy (with an untracked config), a fake worker home, fakes."""
    src = tmp_path / "src"
    (src / "configs").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (src / "configs" / "exp.gin").write_text("TrainConfig.steps = 3\n")
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "add", "pyproject.toml", "configs/exp.gin"], check=True)
    (src / "configs" / "mine.gin").write_text("# untracked, named on the command line\n")
    (src / "notes.txt").write_text("untracked, not named: stays behind\n")
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    script(fake / "bin" / "gcloud", FAKE_GCLOUD)
    py = script(fake / "python", FAKE_PYTHON)
    script(fake / "jalign", FAKE_JALIGN)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PATH": f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}", "JALIGN_SRC": str(src),
           "FAKE_DIR": str(fake), "FAKE_HOME": str(home), "JALIGN_TPU_POLL_SECONDS": "0"}
    return {"src": src, "fake": fake, "home": home, "env": env, "python": str(py)}


def tpu_pod(t, *args, **env):
    cmd = [str(TPU_POD), "--tpu", "pod1", "--zone", "us-z1-a", "--project", "proj",
           "--python", t["python"], *args]
    return subprocess.run(cmd, env={**t["env"], **env}, capture_output=True, text=True, timeout=120)


TRAIN_ARGS = ["configs/exp.gin", "configs/mine.gin", *TRICKY]


@pytest.mark.parametrize("drop", ["--tpu", "--zone", "config"])
def test_tpu_pod_usage_errors(tpu_env, drop):
    args = {"--tpu": ["--tpu", "pod1"], "--zone": ["--zone", "z"], "config": TRAIN_ARGS}
    argv = [x for k, v in args.items() if k != drop for x in v]
    r = subprocess.run([str(TPU_POD), *argv], env=tpu_env["env"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and "usage:" in r.stderr, r.stderr
    assert not (tpu_env["fake"] / "gcloud.jsonl").exists()


def test_tpu_pod_dry_run_prints_gcloud_commands_and_quotes_bindings(tpu_env, tmp_path):
    work = tmp_path / "work dir"  # a space in the workdir, too
    r = tpu_pod(tpu_env, "--workdir", str(work), "--dry-run", *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr
    assert not (tpu_env["fake"] / "gcloud.jsonl").exists(), "dry run ran gcloud"
    cmds = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert [c[:5] for c in cmds] == [["gcloud", "compute", "tpus", "tpu-vm", verb]
                                     for verb in ("scp", "ssh", "ssh")]
    for c in cmds:
        assert "--worker=all" in c
        assert c[c.index("--zone") + 1] == "us-z1-a" and c[c.index("--project") + 1] == "proj"
    assert cmds[0][6] == "pod1:jalign-src-pod1.tar.gz"
    assert cmds[1][5] == cmds[2][5] == "pod1"
    # The run command, executed by a shell as the worker's login shell would: jalign gets
    # exactly the arguments given here, with JALIGN_DISTRIBUTED=on, in the workdir.
    run = cmds[2][cmds[2].index("--command") + 1]
    (work / ".venv" / "bin").mkdir(parents=True)
    script(work / ".venv" / "bin" / "jalign", FAKE_JALIGN)
    subprocess.run(["bash", "-c", run], env={**tpu_env["env"], "HOME": str(tmp_path)}, check=True, timeout=30)
    [call] = records(tpu_env["fake"] / "jalign.jsonl")
    assert call["argv"] == ["train", *TRAIN_ARGS]
    assert call["env"].get("JALIGN_DISTRIBUTED") == "on"
    assert Path(call["cwd"]) == work
    assert (work / ".jalign-run.pid").exists()


def test_tpu_pod_default_workdir_is_the_workers_home(tpu_env):
    r = tpu_pod(tpu_env, "--dry-run", *TRAIN_ARGS)
    assert r.returncode == 0, r.stderr
    run = shlex.split([l for l in r.stdout.splitlines() if l.startswith("+ ")][-1][2:])[-1]
    assert run.startswith('cd "$HOME"/jalign && ')


def gcloud_calls(t):
    return records(t["fake"] / "gcloud.jsonl")


def kinds(calls):
    """scp / setup / run / describe for each gcloud call, in order."""
    out = []
    for c in calls:
        if c[3] == "ssh":
            out.append("run" if "jalign train" in c[c.index("--command") + 1] else "setup")
        else:
            out.append(c[3])
    return out


def test_tpu_pod_retries_once_after_preemption(tpu_env):
    r = tpu_pod(tpu_env, *TRAIN_ARGS, FAKE_RCS="75,0", FAKE_STATES="REPAIRING,READY")
    assert r.returncode == 0, r.stderr
    calls = gcloud_calls(tpu_env)
    assert kinds(calls) == ["scp", "setup", "run", "describe", "describe", "scp", "setup", "run"]
    describe = calls[3]
    assert describe[3:5] == ["describe", "pod1"] and "--format=value(state)" in describe
    assert "restart 1/20" in r.stderr and "REPAIRING" in r.stderr
    runs = records(tpu_env["fake"] / "jalign.jsonl")
    assert [c["argv"] for c in runs] == [["train", *TRAIN_ARGS]] * 2
    assert all(c["env"]["JALIGN_DISTRIBUTED"] == "on" for c in runs)
    # Installed once: the second setup found the same install key and skipped pip.
    pip = (tpu_env["fake"] / "pip.log").read_text().splitlines()
    assert pip == ["install -q -e . jax[tpu]"]
    # The copy holds the tracked files and the named untracked config, nothing else.
    work = tpu_env["home"] / "jalign"
    assert (work / "configs" / "exp.gin").exists() and (work / "configs" / "mine.gin").exists()
    assert not (work / "notes.txt").exists()
    assert not (tpu_env["home"] / "jalign-src-pod1.tar.gz").exists()


def test_tpu_pod_retries_when_ssh_loses_the_vm(tpu_env):
    r = tpu_pod(tpu_env, *TRAIN_ARGS, FAKE_DROP="1")
    assert r.returncode == 0, r.stderr
    assert kinds(gcloud_calls(tpu_env)) == ["scp", "setup", "run", "describe", "scp", "setup", "run"]
    assert len(records(tpu_env["fake"] / "jalign.jsonl")) == 1  # the dropped attempt never ran
    assert "exit 255" in r.stderr


def test_tpu_pod_failure_is_not_retried(tpu_env):
    r = tpu_pod(tpu_env, *TRAIN_ARGS, FAKE_RCS="1")
    assert r.returncode == 1
    assert kinds(gcloud_calls(tpu_env)) == ["scp", "setup", "run"]


def test_tpu_pod_gives_up_after_max_restarts(tpu_env):
    r = tpu_pod(tpu_env, "--max-restarts", "2", *TRAIN_ARGS, FAKE_RCS="75")
    assert r.returncode == 75
    assert kinds(gcloud_calls(tpu_env)).count("run") == 3
    assert kinds(gcloud_calls(tpu_env)).count("describe") == 2
    assert "giving up" in r.stderr


# ----------------------------------------------------------------------- slurm.sbatch

# srun: logs argv + env, exits FAKE_RC; with FAKE_WAIT_TERM it waits for SIGTERM instead
# (as tasks would: save, exit 75). scontrol: logs argv.
FAKE_SRUN = r'''
import json, os, signal, sys, time
d = os.environ["FAKE_DIR"]
with open(os.path.join(d, "srun.jsonl"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}) + "\n")
if os.environ.get("FAKE_WAIT_TERM"):
    def term(*_):
        open(os.path.join(d, "srun_got_term"), "w").close(); sys.exit(75)
    signal.signal(signal.SIGTERM, term)
    open(os.path.join(d, "srun_started"), "w").close()
    time.sleep(20); sys.exit(3)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
'''
FAKE_SCONTROL = r'''
import json, os, sys
with open(os.path.join(os.environ["FAKE_DIR"], "scontrol.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
'''
SLURM_ARGS = ["configs/x.gin", "configs/hw/gpu_multinode.gin", *TRICKY]


@pytest.fixture
def slurm_env(tmp_path):
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    script(fake / "bin" / "srun", FAKE_SRUN)
    script(fake / "bin" / "scontrol", FAKE_SCONTROL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JALIGN"))}
    env |= {"PATH": f"{fake / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(fake),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_NNODES": "3",
            "SLURM_SUBMIT_DIR": str(tmp_path), "JALIGN": "/opt/jalign/bin/jalign"}
    return {"fake": fake, "env": env}


def sbatch_directives():
    """The #SBATCH lines sbatch reads: those before the first command line."""
    out = []
    for line in SLURM.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            out.append(line.split(None, 1)[1])
        elif line.strip() and not line.startswith("#"):
            break
    rest = SLURM.read_text().split(line, 1)[1]
    assert "#SBATCH" not in rest, "an #SBATCH line after the first command is ignored by sbatch"
    return dict(d.split("=", 1) if "=" in d else (d, True) for d in (x.lstrip("-") for x in out))


def test_slurm_directives():
    d = sbatch_directives()
    assert d["ntasks-per-node"] == "1"
    assert int(d["nodes"]) >= 1 and int(d["gpus-per-node"]) >= 1
    assert d["time"] and "%j" in d["output"]
    assert d["signal"].startswith("B:TERM@") and int(d["signal"].split("@")[1]) >= 60
    assert d["requeue"] is True and d["open-mode"] == "append"


def run_sbatch(s, *args, **env):
    return subprocess.run(["bash", str(SLURM), *args], env={**s["env"], **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("rc", [0, 1, 75])
def test_slurm_runs_one_task_per_node_and_requeues_only_on_75(slurm_env, rc):
    r = run_sbatch(slurm_env, *SLURM_ARGS, FAKE_RC=str(rc))
    assert r.returncode == rc, r.stderr
    [call] = records(slurm_env["fake"] / "srun.jsonl")
    argv = call["argv"]
    i = argv.index("/opt/jalign/bin/jalign")
    opts, command = argv[:i], argv[i:]
    assert command == ["/opt/jalign/bin/jalign", "train", *SLURM_ARGS]
    assert {"--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=0"} <= set(opts)
    assert call["env"]["JALIGN_DISTRIBUTED"] == "on"
    assert call["env"]["SLURM_JOB_ID"] == "4242"
    requeues = records(slurm_env["fake"] / "scontrol.jsonl")
    assert requeues == ([["requeue", "4242"]] if rc == 75 else [])


def test_slurm_stops_requeueing_after_max_restarts(slurm_env):
    r = run_sbatch(slurm_env, *SLURM_ARGS, FAKE_RC="75", SLURM_RESTART_COUNT="5", JALIGN_MAX_RESTARTS="5")
    assert r.returncode == 75 and "giving up" in r.stderr
    assert records(slurm_env["fake"] / "scontrol.jsonl") == []


# A shell that is slow after each `kill` (as on a loaded machine): the forwarded SIGTERM's
# task is gone, its status already collected by bash, before the script looks for it.
SLOW_KILL = 'kill() { builtin kill "$@"; local rc=$?; sleep 0.5; return $rc; }\n'


@pytest.mark.parametrize("shell", ["plain", "slow_kill"])
def test_slurm_forwards_the_time_limit_signal_and_requeues(slurm_env, shell, tmp_path):
    """--signal=B:TERM@120 signals the batch shell; it must reach the tasks (via srun)."""
    env = {**slurm_env["env"], "FAKE_WAIT_TERM": "1"}
    if shell == "slow_kill":  # BASH_ENV is sourced by the non-interactive script's shell
        (tmp_path / "slow_kill.sh").write_text(SLOW_KILL)
        env["BASH_ENV"] = str(tmp_path / "slow_kill.sh")
    p = subprocess.Popen(["bash", str(SLURM), *SLURM_ARGS], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (slurm_env["fake"] / "srun_started").exists():
        assert time.monotonic() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert (slurm_env["fake"] / "srun_got_term").exists()
    assert p.returncode == 75, err
    assert records(slurm_env["fake"] / "scontrol.jsonl") == [["requeue", "4242"]]


def test_slurm_without_args_is_a_usage_error(slurm_env):
    r = run_sbatch(slurm_env)
    assert r.returncode == 2 and "usage:" in r.stderr
    assert not (slurm_env["fake"] / "srun.jsonl").exists()


# ---------------------------------------------------------------------- gke_jobset.py

def manifest(*args):
    r = subprocess.run([sys.executable, str(GKE), *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def parts(m):
    [rj] = m["spec"]["replicatedJobs"]
    job = rj["template"]["spec"]
    pod = job["template"]["spec"]
    [c] = pod["containers"]
    return rj, job, pod, c, {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def check_restart_policy(m, job, pod):
    assert m["spec"]["failurePolicy"]["maxRestarts"] == 3
    assert m["spec"]["failurePolicy"]["rules"] == [
        {"name": "preempted", "action": "RestartJobSetAndIgnoreMaxRestarts",
         "onJobFailureReasons": ["PodFailurePolicy"]}]
    assert job["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    rules = job["podFailurePolicy"]["rules"]
    assert {"action": "FailJob",
            "onExitCodes": {"containerName": "jalign", "operator": "In", "values": [75]}} in rules
    assert {"action": "FailJob",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules


@pytest.mark.parametrize("accel,topology,hosts,chips", [
    ("tpu-v5e-16", "4x4", 4, 4), ("tpu-v5e-8", "2x4", 1, 8), ("tpu-v6e-64", "8x8", 16, 4),
    ("tpu-v4-16", "2x2x2", 2, 4), ("tpu-v5p-8", "2x2x1", 1, 4), ("tpu-v5p-128", "4x4x4", 16, 4)])
def test_gke_tpu_slice(accel, topology, hosts, chips):
    m = manifest("--accelerator", accel, "--image", "gcr.io/p/jalign:1", "--name", "sft",
                 "configs/x.gin", "configs/hw/tpu_v5e_16.gin", *TRICKY)
    assert m["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and m["kind"] == "JobSet"
    assert m["spec"]["network"]["enableDNSHostnames"] is True
    rj, job, pod, c, env = parts(m)
    assert rj["replicas"] == 1
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] == hosts
    label = {"v4": "tpu-v4-podslice", "v5p": "tpu-v5p-slice", "v5e": "tpu-v5-lite-podslice",
             "v6e": "tpu-v6e-slice"}[accel.split("-")[1]]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": label,
                                   "cloud.google.com/gke-tpu-topology": topology}
    assert c["resources"]["limits"] == {"google.com/tpu": chips}
    assert c["image"] == "gcr.io/p/jalign:1"
    assert c["command"] == ["jalign", "train", "configs/x.gin", "configs/hw/tpu_v5e_16.gin", *TRICKY]
    assert env["JALIGN_DISTRIBUTED"] == "on" and "JALIGN_COORDINATOR" not in env
    assert not any(k.startswith("MEGASCALE") for k in env)
    check_restart_policy(m, job, pod)


def test_gke_tpu_multislice():
    m = manifest("--accelerator", "tpu-v5e-16", "--slices", "2", "--image", "i", "--name", "ms", "c.gin")
    rj, job, pod, c, env = parts(m)
    assert rj["replicas"] == 2 and job["parallelism"] == 4
    annotations = m["metadata"]["annotations"]
    assert annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
    assert env["MEGASCALE_NUM_SLICES"] == "2"
    assert env["MEGASCALE_SLICE_ID"] == {
        "fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}}
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "ms-slice-0-0.ms"


def test_gke_gpu_nodes():
    m = manifest("--accelerator", "gpu-h100-8", "--nodes", "2", "--image", "img", "--name", "dpo",
                 "--env", "HF_HOME=/cache", "configs/x.gin", "configs/hw/gpu_8.gin", *TRICKY)
    rj, job, pod, c, env = parts(m)
    assert rj["name"] == "workers" and rj["replicas"] == 1
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] == 2
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert c["command"] == ["jalign", "train", "configs/x.gin", "configs/hw/gpu_8.gin", *TRICKY]
    # Pod 0 of the JobSet under its headless service (<jobset>-<replicatedJob>-<job>-<pod>.<jobset>).
    assert env["JALIGN_COORDINATOR"] == "dpo-workers-0-0.dpo:8476"
    assert env["JALIGN_NUM_PROCESSES"] == "2"
    assert env["JALIGN_PROCESS_ID"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert env["HF_HOME"] == "/cache" and "JALIGN_DISTRIBUTED" not in env
    assert {p["containerPort"] for p in c["ports"]} == {8476, 8477}  # coordinator + rendezvous
    assert "annotations" not in m["metadata"]
    check_restart_policy(m, job, pod)


@pytest.mark.parametrize("args", [
    ["--accelerator", "tpu-v5e-16", "--image", "i", "--name", "x"],                      # no config
    ["--accelerator", "tpu-v5e-12", "--image", "i", "--name", "x", "c.gin"],             # no topology
    ["--accelerator", "tpu-v5e-16", "--nodes", "2", "--image", "i", "--name", "x", "c.gin"],
    ["--accelerator", "tpu-v5e-8", "--slices", "2", "--image", "i", "--name", "x", "c.gin"],
    ["--accelerator", "gpu-h100-8", "--slices", "2", "--image", "i", "--name", "x", "c.gin"],
    ["--accelerator", "gpu-z9-8", "--image", "i", "--name", "x", "c.gin"],
    ["--accelerator", "gpu-h100-8", "--image", "i", "--name", "Bad_Name", "c.gin"],
])
def test_gke_rejects_bad_requests(args):
    r = subprocess.run([sys.executable, str(GKE), *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stdout == "" and "error:" in r.stderr, r
