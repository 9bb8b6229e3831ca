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
