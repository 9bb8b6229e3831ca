"""Joining a multi-host run: JAX's multi-controller runtime, started from config or env.

Every host runs the same ``jalign train`` command; ``initialize`` turns the processes into
one JAX job before any device is touched (``jax.distributed.initialize``). Where it gets
the coordinator, the process count and this process's id:

- explicit: ``DistributedConfig.coordinator/num_processes/process_id`` or the env vars
  ``JALIGN_COORDINATOR`` (host:port of process 0), ``JALIGN_NUM_PROCESSES``,
  ``JALIGN_PROCESS_ID`` (a launcher sets these per process; env wins over gin);
- detected by JAX: Cloud TPU VMs / GKE TPU and SLURM (``SLURM_JOB_ID``, ``SLURM_NTASKS``,
  ``SLURM_PROCID``, ``SLURM_STEP_NODELIST``); ``mode='on'`` (``JALIGN_DISTRIBUTED=on``)
  asks JAX to detect, and ``mode='auto'`` does so by itself under a multi-task SLURM step
  or where GKE marks a multi-host TPU slice (``TPU_WORKER_HOSTNAMES``, ``MEGASCALE_*``); a
  plain Cloud TPU VM slice gives no such sign, so say ``on`` there (tpu_pod.sh does).

JAX's own wait for peers ends in a C++ abort after its timeout, which says neither who
is missing nor what to do. So processes first meet at a small rendezvous next to the
coordinator (its port + 1, ``JALIGN_RENDEZVOUS_PORT`` to change it): process 0 waits up to
``timeout_s`` for every other process and fails with a one-line error naming the ones
that did not come; the others fail naming the coordinator they could not reach.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time

from jalign.errors import ConfigError

MODES = ("auto", "on", "off")
ENV = {"mode": "JALIGN_DISTRIBUTED", "coordinator": "JALIGN_COORDINATOR",
       "num_processes": "JALIGN_NUM_PROCESSES", "process_id": "JALIGN_PROCESS_ID",
       "timeout_s": "JALIGN_INIT_TIMEOUT"}
EXIT_PEERS_MISSING = 4  # the watchdog's exit code when JAX itself does not connect in time


class DistributedError(ConfigError):
    """The processes of a multi-host run did not come together (one line, names who)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-host run (see the module docstring); env vars
    ``JALIGN_*`` override these fields. ``timeout_s``: how long to wait for every peer."""

    mode: str = "auto"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"DistributedConfig.mode={self.mode!r}: one of {MODES}")
        if self.timeout_s <= 0:
            raise ValueError(f"DistributedConfig.timeout_s={self.timeout_s} must be positive")


def from_env(config: DistributedConfig, environ=os.environ) -> DistributedConfig:
    """``config`` with every field the environment sets (``JALIGN_*``) replaced."""
    values = {}
    for field, var in ENV.items():
        text = environ.get(var)
        if text is None or text == "":
            continue
        if field in ("num_processes", "process_id", "timeout_s"):
            try:
                values[field] = int(text)
            except ValueError:
                raise ConfigError(f"{var}={text!r} is not an integer") from None
        else:
            values[field] = text
    try:
        return dataclasses.replace(config, **values)
    except ValueError as e:
        raise ConfigError(f"{e} (from the environment)") from None


def detected_cluster(environ=os.environ) -> str | None:
    """The multi-host environment ``mode='auto'`` joins without being told: 'slurm' inside
    an ``srun`` step of several tasks, 'tpu' on a multi-host TPU slice; None otherwise."""
    if environ.get("SLURM_STEP_ID") is not None and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if "," in environ.get("TPU_WORKER_HOSTNAMES", "") or int(
            environ.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
        return "tpu"
    return None


def initialize(config: DistributedConfig | None = None, environ=os.environ) -> dict:
    """Join the run ``config`` (and the environment) describe; a no-op for one process or
    when already joined. Returns {"process_id", "num_processes", "how"}. Must run before
    anything touches a JAX device."""
    import jax
    from jax._src import distributed as jax_distributed

    config = from_env(config or DistributedConfig(), environ)
    if jax_distributed.global_state.client is not None:  # already joined
        return {"process_id": jax.process_index(), "num_processes": jax.process_count(),
                "how": "already"}
    explicit = config.coordinator is not None
    if config.mode == "off" or (config.mode == "auto" and not explicit
                                and detected_cluster(environ) is None):
        return {"process_id": 0, "num_processes": 1, "how": "single"}
    if explicit:
        missing = [ENV[f] for f in ("num_processes", "process_id") if getattr(config, f) is None]
        if missing:
            raise ConfigError(f"JALIGN_COORDINATOR={config.coordinator!r} is set but "
                              f"{' and '.join(missing)} not (DistributedConfig fields)")
        coordinator, n, pid = config.coordinator, config.num_processes, config.process_id
        local_ids, how = None, "explicit"
    else:
        coordinator, n, pid, local_ids = _detect(config.timeout_s, environ)
        how = "detected"
    if not 0 <= pid < n:
        raise ConfigError(f"process id {pid} is not in [0, {n}) ({ENV['process_id']}, "
                          f"{ENV['num_processes']})")
    if n > 1:
        _split(coordinator)  # a malformed address fails before anything changes
        _cpu_collectives(jax)
        if environ.get("JALIGN_RENDEZVOUS", "on") != "off":
            rendezvous(coordinator, n, pid, config.timeout_s, environ,
                       detected=how == "detected")
        # Everyone is there, so JAX connects at once; if it does not, the watchdog's line
        # comes before JAX's own (later) abort.
        with _watchdog(config.timeout_s + 30, f"process {pid} of {n}: JAX's coordination "
                       f"service at {coordinator} did not connect"):
            # Detection is off: everything is known, and JAX's SLURM detection would
            # otherwise restrict a process to GPU SLURM_LOCALID even with one per node.
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=n,
                                       process_id=pid, local_device_ids=local_ids,
                                       cluster_detection_method="deactivate",
                                       initialization_timeout=config.timeout_s + 90)
    return {"process_id": pid, "num_processes": n, "how": how}


def _detect(timeout_s: int, environ=os.environ) -> tuple[str, int, int, list[int] | None]:
    """Coordinator, process count, id and local devices as JAX's cluster detection finds
    them (TPU, SLURM, ...), so the rendezvous can name missing peers there too. Under
    SLURM with one task per node the process drives all of the node's devices (JAX alone
    would give it only device SLURM_LOCALID); with one task per device, its own one."""
    from jax._src import clusters
    try:
        coordinator, n, pid, local_ids = (
            clusters.ClusterEnv.auto_detect_unset_distributed_params(
                None, None, None, None, None, timeout_s))
    except Exception as e:  # noqa: BLE001 (JAX raises bare errors from each detector)
        raise DistributedError(f"JALIGN_DISTRIBUTED=on but JAX found no cluster to join "
                               f"({type(e).__name__}: {e}); set JALIGN_COORDINATOR, "
                               "JALIGN_NUM_PROCESSES and JALIGN_PROCESS_ID instead") from None
    if coordinator is None or n is None or pid is None:
        raise DistributedError("JALIGN_DISTRIBUTED=on but JAX detected no cluster (not a "
                               "TPU pod or SLURM step); set JALIGN_COORDINATOR, "
                               "JALIGN_NUM_PROCESSES and JALIGN_PROCESS_ID instead")
    if local_ids is not None and _tasks_per_node(environ) == 1:
        local_ids = None
    return coordinator, int(n), int(pid), local_ids


def _tasks_per_node(environ) -> int | None:
    """SLURM's tasks on this node (``SLURM_STEP_TASKS_PER_NODE`` is e.g. '1(x2)' or '8')."""
    text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not text:
        return None
    head = text.split(",")[0].split("(")[0]
    return int(head) if head.isdigit() else None


def _cpu_collectives(jax) -> None:
    """CPU processes need a cross-process collectives backend (none by default)."""
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


# ------------------------------------------------------------------------- rendezvous

def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"coordinator address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def rendezvous_port(coordinator_port: int, detected: bool, environ=os.environ) -> int:
    """``JALIGN_RENDEZVOUS_PORT``, else next to the coordinator's. A detected SLURM port is
    61440 + job id mod 4096, so + 1 would be the next job's coordinator: go 4096 below,
    out of that range."""
    if environ.get("JALIGN_RENDEZVOUS_PORT"):
        return int(environ["JALIGN_RENDEZVOUS_PORT"])
    if detected and coordinator_port > 4096:
        return coordinator_port - 4096
    return coordinator_port + 1 if coordinator_port < 65535 else coordinator_port - 1


def rendezvous(coordinator: str, n: int, pid: int, timeout_s: float, environ=os.environ,
               detected: bool = False) -> None:
    """Every process meets process 0 next to ``coordinator`` within ``timeout_s``, or a
    DistributedError names who is missing."""
    host, port = _split(coordinator)
    port = rendezvous_port(port, detected, environ)
    deadline = time.monotonic() + timeout_s
    if pid == 0:
        _host_rendezvous(port, n, deadline, timeout_s, coordinator)
    else:
        _join_rendezvous(host, port, n, pid, deadline, timeout_s)


def _listen(port: int, n: int) -> socket.socket:
    try:
        if socket.has_dualstack_ipv6():  # IPv4 and IPv6 peers alike
            return socket.create_server(("", port), family=socket.AF_INET6,
                                        dualstack_ipv6=True, backlog=max(n, 16))
        return socket.create_server(("", port), backlog=max(n, 16))
    except OSError as e:
        raise DistributedError(f"process 0 cannot listen on the rendezvous port {port} ({e}); "
                               "set JALIGN_RENDEZVOUS_PORT to a free port, the same on every "
                               "host (or JALIGN_RENDEZVOUS=off to skip the check)") from None


def _alive(conn: socket.socket) -> bool:
    """The peer is still connected (a peer that died after its hello reads as EOF)."""
    try:
        conn.setblocking(False)
        return conn.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        conn.setblocking(True)


def _host_rendezvous(port: int, n: int, deadline: float, timeout_s: float, where: str) -> None:
    server = _listen(port, n)
    server.settimeout(0.5)
    arrived: dict[int, socket.socket] = {}
    try:
        while True:
            if len(arrived) == n - 1:
                # A peer that said hello and then died (and maybe restarted, saying hello
                # again) is not there: drop it and keep waiting for it.
                for peer in [p for p, c in arrived.items() if not _alive(c)]:
                    arrived.pop(peer).close()
                if len(arrived) == n - 1:
                    break
            if time.monotonic() > deadline:
                missing = [i for i in range(1, n) if i not in arrived]
                shown = ", ".join(map(str, missing[:16])) + (" ..." if len(missing) > 16 else "")
                raise DistributedError(
                    f"process 0 of {n}: {len(missing)} process(es) did not arrive within "
                    f"{timeout_s:g} s (missing process id(s): {shown}); check that every host "
                    f"started the same command and can reach {where} "
                    "(JALIGN_INIT_TIMEOUT sets the wait)")
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            conn.settimeout(5.0)  # a peer says hello at once; a stray client is not kept
            try:
                hello = conn.recv(64).decode(errors="replace").split()
            except OSError:
                conn.close()
                continue
            if len(hello) != 3 or hello[0] != "jalign-hello" or not (
                    hello[1].isdigit() and hello[2].isdigit()):
                conn.close()  # something else knocking on the port: not a peer
                continue
            peer, peer_n = int(hello[1]), int(hello[2])
            if peer_n != n:
                raise DistributedError(f"process {peer} was started with {peer_n} processes, "
                                       f"process 0 with {n}: every host needs the same count")
            if not 0 < peer < n:
                raise DistributedError(f"a process claims process id {peer}, not in [1, {n}): "
                                       "give every host its own id")
            if peer in arrived:
                if _alive(arrived[peer]):
                    raise DistributedError(f"two processes claim process id {peer}: give "
                                           "every host its own id")
                arrived.pop(peer).close()  # its earlier incarnation died
            arrived[peer] = conn
        for conn in arrived.values():
            try:
                conn.sendall(b"go\n")
            except OSError:  # died in the last instant: it fails on its side, and JAX's
                pass         # connect below then times out with the watchdog's message
    finally:
        for conn in arrived.values():
            conn.close()
        server.close()


def _join_rendezvous(host: str, port: int, n: int, pid: int, deadline: float,
                     timeout_s: float) -> None:
    reached = False
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2) as conn:
                reached = True
                conn.sendall(f"jalign-hello {pid} {n}\n".encode())
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                if conn.recv(8).startswith(b"go"):
                    return
        except (OSError, socket.timeout):
            pass
        time.sleep(0.2)
    if reached:
        raise DistributedError(f"process {pid} of {n}: reached process 0 at {host}:{port}, but "
                               f"not every process arrived within {timeout_s:g} s (process 0's "
                               "log names the missing ones)")
    raise DistributedError(f"process {pid} of {n}: process 0 (the coordinator) at {host}:{port} "
                           f"did not answer within {timeout_s:g} s; check that it started and "
                           "that this host can reach it (JALIGN_INIT_TIMEOUT sets the wait)")


class _watchdog:
    """Exit with a one-line message if the block has not finished after ``seconds`` (JAX's
    own timeout is a C++ abort with a stack trace)."""

    def __init__(self, seconds: float, message: str):
        self.seconds, self.message = seconds, message
        self._done = threading.Event()

    def __enter__(self):
        def watch():
            if not self._done.wait(self.seconds):
                import sys
                print(f"jalign: error: {self.message} within {self.seconds:g} s", file=sys.stderr,
                      flush=True)
                os._exit(EXIT_PEERS_MISSING)
        threading.Thread(target=watch, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._done.set()
