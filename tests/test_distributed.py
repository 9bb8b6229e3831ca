"""Joining a multi-host run: the config/env reading and what ``mode='auto'`` joins. (The
processes really joining, and missing peers, are in tests/multihost.)"""

import pytest

from jalign.distributed import DistributedConfig, detected_cluster, from_env, initialize
from jalign.errors import ConfigError


def test_env_overrides_gin_fields():
    c = from_env(DistributedConfig(timeout_s=9), {
        "JALIGN_COORDINATOR": "10.0.0.2:1234", "JALIGN_NUM_PROCESSES": "16",
        "JALIGN_PROCESS_ID": "3", "JALIGN_DISTRIBUTED": "on"})
    assert (c.coordinator, c.num_processes, c.process_id, c.mode, c.timeout_s) == (
        "10.0.0.2:1234", 16, 3, "on", 9)


@pytest.mark.parametrize("env, needle", [
    ({"JALIGN_NUM_PROCESSES": "two"}, "JALIGN_NUM_PROCESSES='two' is not an integer"),
    ({"JALIGN_DISTRIBUTED": "yes"}, "DistributedConfig.mode='yes'"),
    ({"JALIGN_INIT_TIMEOUT": "0"}, "timeout_s=0 must be positive"),
])
def test_bad_env_is_a_config_error_naming_it(env, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        from_env(DistributedConfig(), env)


def test_auto_joins_slurm_steps_and_tpu_slices_only():
    assert detected_cluster({}) is None
    # sbatch's own shell (no step) and a one-task step are single processes
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}) is None
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0",
                             "SLURM_NTASKS": "4"}) == "slurm"
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == "tpu"


def test_single_process_needs_nothing():
    assert initialize(DistributedConfig(), {})["num_processes"] == 1
    assert initialize(DistributedConfig(mode="off"),
                      {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"})["how"] == "single"


@pytest.mark.parametrize("env, needle", [
    ({"JALIGN_COORDINATOR": "h:1", "JALIGN_PROCESS_ID": "0"}, "JALIGN_NUM_PROCESSES"),
    ({"JALIGN_COORDINATOR": "h:1", "JALIGN_NUM_PROCESSES": "2", "JALIGN_PROCESS_ID": "2"},
     r"process id 2 is not in \[0, 2\)"),
    ({"JALIGN_COORDINATOR": "nohostport", "JALIGN_NUM_PROCESSES": "2",
      "JALIGN_PROCESS_ID": "1"}, "is not host:port"),
])
def test_explicit_mode_problems_are_named_before_any_wait(env, needle):
    with pytest.raises(ConfigError, match=needle):
        initialize(DistributedConfig(timeout_s=1), env)


# ---------------------------------------------------------------- the rendezvous itself

import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from jalign.distributed import DistributedError, rendezvous, rendezvous_port  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _meet(coordinator, n, pids, timeout=5.0, env=None):
    """Run the rendezvous of ``pids`` in threads; {pid: None or the error}."""
    results = {}
    env = env or {}

    def one(pid):
        try:
            rendezvous(coordinator, n, pid, timeout, env)
            results[pid] = None
        except DistributedError as e:
            results[pid] = e
    threads = [threading.Thread(target=one, args=(p,)) for p in pids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return results


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_everyone_meets(host):
    if host.startswith("[") and not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 loopback to test with")
    port = _free_port()
    assert _meet(f"{host}:{port - 1}", 4, [0, 1, 2, 3]) == {0: None, 1: None, 2: None, 3: None}


def test_a_peer_that_died_after_hello_is_waited_for_again():
    port = _free_port()
    results = {}
    host = threading.Thread(target=lambda: results.update(
        {0: _meet(f"127.0.0.1:{port - 1}", 3, [0], timeout=8)[0]}))
    host.start()
    time.sleep(0.3)
    # Process 1 says hello and dies; then process 2 arrives: process 0 must not go on.
    with socket.create_connection(("127.0.0.1", port), timeout=2) as dead:
        dead.sendall(b"jalign-hello 1 3\n")
    time.sleep(0.2)
    late = threading.Thread(target=lambda: results.update(
        {2: _meet(f"127.0.0.1:{port - 1}", 3, [2], timeout=8)[2]}))
    late.start()
    time.sleep(1.0)
    assert 0 not in results, "process 0 went on with a dead peer"
    restarted = _meet(f"127.0.0.1:{port - 1}", 3, [1], timeout=8)  # process 1 comes back
    host.join(10)
    late.join(10)
    assert results == {0: None, 2: None} and restarted == {1: None}


def test_two_processes_with_one_id_are_refused():
    port = _free_port()
    results = {}
    host = threading.Thread(target=lambda: results.update(
        {0: _meet(f"127.0.0.1:{port - 1}", 3, [0], timeout=4)[0]}))
    host.start()
    time.sleep(0.3)
    a = socket.create_connection(("127.0.0.1", port), timeout=2)
    a.sendall(b"jalign-hello 1 3\n")
    b = socket.create_connection(("127.0.0.1", port), timeout=2)
    b.sendall(b"jalign-hello 1 3\n")
    host.join(10)
    a.close()
    b.close()
    assert "two processes claim process id 1" in str(results[0])


def test_rendezvous_ports():
    assert rendezvous_port(1234, detected=False, environ={}) == 1235
    assert rendezvous_port(65535, detected=False, environ={}) == 65534
    # SLURM's detected ports are 61440 + job id mod 4096: + 1 is the next job's
    assert rendezvous_port(61440 + 17, detected=True, environ={}) == 57344 + 17
    assert rendezvous_port(8476, detected=False, environ={"JALIGN_RENDEZVOUS_PORT": "9000"}) == 9000


def test_slurm_one_task_per_node_drives_every_local_device():
    from jalign.distributed import _tasks_per_node
    assert _tasks_per_node({"SLURM_STEP_TASKS_PER_NODE": "1(x2)"}) == 1
    assert _tasks_per_node({"SLURM_STEP_TASKS_PER_NODE": "8(x4)"}) == 8
    assert _tasks_per_node({"SLURM_TASKS_PER_NODE": "2,1"}) == 2
    assert _tasks_per_node({}) is None


def test_a_batch_block_split_over_processes_is_refused():
    """TPU meshes can put one batch block's tensor-parallel devices on two hosts (e.g.
    v5e-16 with fsdp=4 x tensor=4); each host would hand in its own rows for it."""
    from types import SimpleNamespace

    import numpy as np

    from jalign.train.preflight import check_batch_blocks

    def mesh(owners):  # owners[d][f][t] -> process index
        devices = np.vectorize(lambda p: SimpleNamespace(process_index=int(p)),
                               otypes=[object])(np.asarray(owners))
        return SimpleNamespace(devices=devices, axis_names=("data", "fsdp", "tensor"))

    check_batch_blocks(mesh([[[0, 0], [1, 1]]]))          # fsdp=2 over hosts, tensor inside
    check_batch_blocks(mesh([[[0, 0], [0, 0]], [[1, 1], [1, 1]]]))  # data over hosts
    with pytest.raises(ConfigError, match=r"batch block 0 .* held by devices of processes \[0, 1\]"):
        check_batch_blocks(mesh([[[0, 1], [0, 1]]]))      # tensor pairs across hosts
