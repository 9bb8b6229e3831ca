#!/usr/bin/env python3
"""Print a Kubernetes JobSet (jobset.x-k8s.io/v1alpha2) that runs `jalign train ARGS...`
on GKE TPU slices or GPU nodes. Standard library only; pipe it to `kubectl apply -f -`:

  python launch/gke_jobset.py --accelerator tpu-v5e-16 --image IMAGE --name sft \\
      configs/demo/sft_add.gin configs/hw/tpu_v5e_16.gin --gin "TrainConfig.steps=2000"
  python launch/gke_jobset.py --accelerator gpu-h100-8 --nodes 2 --image IMAGE --name sft \\
      configs/demo/sft_add.gin configs/hw/gpu_8.gin

Everything after the first config file goes to `jalign train` unchanged, so put this
script's options first. The image must hold jalign (with the JAX build for the
accelerator) and the config files, at the paths given (relative to --workdir).

One pod per host. TPU (`tpu-<v4|v5e|v5p|v6e>-<N>`, N as in the Cloud TPU accelerator
type: chips for v5e/v6e, TensorCores = 2 x chips for v4/v5p): one replicated job per slice
(--slices), pods = hosts of the slice's topology, `google.com/tpu` = chips per host,
JALIGN_DISTRIBUTED=on (JAX reads the TPU_WORKER_* variables GKE puts in TPU pods; for
several slices it also needs MEGASCALE_NUM_SLICES / _SLICE_ID / _COORDINATOR_ADDRESS, set
here from the JobSet's labels). GPU (`gpu-<type>-<gpus per node>`): --nodes pods, each
given JALIGN_COORDINATOR (pod 0's DNS name under the JobSet's headless service),
JALIGN_NUM_PROCESSES and JALIGN_PROCESS_ID (the pod's Job completion index).

Restarts: every Job has backoffLimit 0, so one failed pod fails its Job and the JobSet
recreates all pods (multi-controller JAX needs every process restarted together). A pod
that exits 75 (checkpoint saved on SIGTERM) or is disrupted (node preemption, eviction)
fails the Job through its podFailurePolicy (reason PodFailurePolicy), and the JobSet rule
restarts without counting it (RestartJobSetAndIgnoreMaxRestarts); any other failure
restarts at most --max-restarts times, then the JobSet fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

# GKE node label, topology dimensions, chips on one host of a multi-host slice, most chips
# a single-host slice has, TensorCores per chip (how Cloud TPU numbers the type).
TPUS = {
    "v4": ("tpu-v4-podslice", 3, 4, 4, 2),
    "v5p": ("tpu-v5p-slice", 3, 4, 4, 2),
    "v5e": ("tpu-v5-lite-podslice", 2, 4, 8, 1),
    "v6e": ("tpu-v6e-slice", 2, 4, 8, 1),
}
TOPOLOGIES = {  # default topology per chip count
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"},
}
GPUS = {  # GKE's cloud.google.com/gke-accelerator values
    "h100": "nvidia-h100-80gb", "h100-mega": "nvidia-h100-mega-80gb",
    "h200": "nvidia-h200-141gb", "b200": "nvidia-b200",
    "a100": "nvidia-tesla-a100", "a100-80gb": "nvidia-a100-80gb", "l4": "nvidia-l4",
}
COORDINATOR_PORT = 8476  # jalign's rendezvous uses the next port (8477)


def tpu_slice(accelerator: str, topology: str | None) -> dict:
    m = re.fullmatch(r"tpu-(v4|v5p|v5e|v6e)-(\d+)", accelerator)
    if not m:
        raise ValueError(f"--accelerator {accelerator!r}: expected tpu-<{'|'.join(TPUS)}>-<N>")
    label, ndims, per_host, single_host_max, cores = TPUS[m[1]]
    if int(m[2]) % cores:
        raise ValueError(f"--accelerator {accelerator!r}: {m[1]}-N counts TensorCores ({cores} a chip)")
    chips = int(m[2]) // cores
    if topology is None:
        topology = TOPOLOGIES[ndims].get(chips)
        if topology is None:
            raise ValueError(f"no default topology for {accelerator} ({chips} chips); pass --topology")
    dims = topology.split("x")
    if len(dims) != ndims or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise ValueError(f"--topology {topology!r}: {m[1]} takes {ndims} dimensions like "
                         f"{next(iter(TOPOLOGIES[ndims].values()))}")
    n = 1
    for d in dims:
        n *= int(d)
    if n != chips:
        raise ValueError(f"--topology {topology} has {n} chips but {accelerator} has {chips}")
    hosts = 1 if chips <= single_host_max else chips // per_host
    return {"label": label, "topology": topology, "hosts": hosts, "chips_per_host": chips // hosts}


def gpu_nodes(accelerator: str) -> dict:
    m = re.fullmatch(r"gpu-(.+)-(\d+)", accelerator)
    if not m or m[1] not in GPUS:
        raise ValueError(f"--accelerator {accelerator!r}: expected "
                         f"gpu-<{'|'.join(GPUS)}>-<GPUs per node>")
    return {"label": GPUS[m[1]], "gpus": int(m[2])}


def env_var(name: str, value) -> dict:
    return {"name": name, "value": str(value)}


def env_field(name: str, path: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def jobset(a: argparse.Namespace) -> dict:
    tpu = a.accelerator.startswith("tpu-")
    env = [env_var("JALIGN_INIT_TIMEOUT", a.init_timeout)]
    annotations = {}
    if tpu:
        s = tpu_slice(a.accelerator, a.topology)
        if a.nodes is not None and a.nodes != s["hosts"]:
            raise ValueError(f"--nodes {a.nodes}: a {a.accelerator} slice has {s['hosts']} hosts")
        if a.slices > 1 and s["hosts"] == 1:
            raise ValueError("several slices need multi-host slices (GKE Multislice)")
        rjob, pods, replicas = "slice", s["hosts"], a.slices
        selector = {"cloud.google.com/gke-tpu-accelerator": s["label"],
                    "cloud.google.com/gke-tpu-topology": s["topology"]}
        limits = {"google.com/tpu": s["chips_per_host"]}
        env.append(env_var("JALIGN_DISTRIBUTED", "on"))
        if a.slices > 1:
            env += [env_var("MEGASCALE_NUM_SLICES", a.slices),
                    env_field("MEGASCALE_SLICE_ID", "metadata.labels['jobset.sigs.k8s.io/job-index']"),
                    env_var("MEGASCALE_COORDINATOR_ADDRESS", f"{a.name}-{rjob}-0-0.{a.name}")]
        # One slice per node pool, never a slice spread over two.
        annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"] = "cloud.google.com/gke-nodepool"
    else:
        if a.slices != 1 or a.topology:
            raise ValueError("--slices and --topology are for TPUs")
        g = gpu_nodes(a.accelerator)
        rjob, pods, replicas = "workers", a.nodes or 1, 1
        selector = {"cloud.google.com/gke-accelerator": g["label"]}
        limits = {"nvidia.com/gpu": g["gpus"]}
        env += [env_var("JALIGN_COORDINATOR", f"{a.name}-{rjob}-0-0.{a.name}:{COORDINATOR_PORT}"),
                env_var("JALIGN_NUM_PROCESSES", pods),
                env_field("JALIGN_PROCESS_ID",
                          "metadata.annotations['batch.kubernetes.io/job-completion-index']")]
    longest = f"{a.name}-{rjob}-{replicas - 1}-{pods - 1}"
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a.name) or len(longest) > 63:
        raise ValueError(f"--name {a.name!r}: lowercase letters, digits and '-', and the pod "
                         f"hostname {longest!r} must fit in 63 characters")
    for item in a.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ValueError(f"--env {item!r}: expected NAME=VALUE")
        env.append(env_var(name, value))

    container = {"name": "jalign", "image": a.image,
                 "command": [*a.jalign.split(), "train", *a.train_args],
                 "env": env, "resources": {"limits": limits}}
    if a.workdir:
        container["workingDir"] = a.workdir
    pod = {"restartPolicy": "Never", "terminationGracePeriodSeconds": a.grace_period,
           "nodeSelector": selector, "containers": [container]}
    if not tpu:
        container["ports"] = [{"containerPort": COORDINATOR_PORT},
                              {"containerPort": COORDINATOR_PORT + 1}]
        # NCCL needs more shared memory than a container's default 64 MiB /dev/shm.
        container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    job = {
        "completionMode": "Indexed", "parallelism": pods, "completions": pods, "backoffLimit": 0,
        "podFailurePolicy": {"rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": "jalign", "operator": "In", "values": [75]}},
            {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]},
        "template": {"spec": pod},
    }
    metadata = {"name": a.name}
    if a.namespace:
        metadata["namespace"] = a.namespace
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": metadata,
        "spec": {
            "network": {"enableDNSHostnames": True},  # pods resolve as <pod>.<jobset name>
            "failurePolicy": {"maxRestarts": a.max_restarts, "rules": [
                {"name": "preempted", "action": "RestartJobSetAndIgnoreMaxRestarts",
                 "onJobFailureReasons": ["PodFailurePolicy"]}]},
            "replicatedJobs": [{"name": rjob, "replicas": replicas, "template": {"spec": job}}],
        },
    }


# ------------------------------------------------------------------------------ YAML
def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v))  # a JSON string is a valid double-quoted YAML scalar


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) else json.dumps(k)


def to_yaml(obj, indent: int = 0) -> list[str]:
    """Block-style YAML lines for dicts, lists and scalars (dict items in list items)."""
    pad = " " * indent
    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{_key(k)}:")
                lines += to_yaml(v, indent + 2)
            elif isinstance(v, (dict, list)):
                lines.append(f"{pad}{_key(k)}: {'{}' if isinstance(v, dict) else '[]'}")
            else:
                lines.append(f"{pad}{_key(k)}: {_scalar(v)}")
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict) and v:
                sub = to_yaml(v, indent + 2)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines += sub[1:]
            elif isinstance(v, (dict, list)):
                raise ValueError("nested lists / empty dicts in lists are not emitted")
            else:
                lines.append(f"{pad}- {_scalar(v)}")
    else:
        lines.append(pad + _scalar(obj))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/gke_jobset.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--accelerator", required=True, help="tpu-v5e-16, tpu-v4-32, gpu-h100-8, ...")
    p.add_argument("--image", required=True)
    p.add_argument("--name", required=True, help="JobSet name (also its DNS subdomain)")
    p.add_argument("--nodes", type=int, help="GPU nodes (default 1); TPU: derived from the topology")
    p.add_argument("--slices", type=int, default=1, help="TPU slices (Multislice), default 1")
    p.add_argument("--topology", help="TPU topology, default from the chip count")
    p.add_argument("--max-restarts", type=int, default=3, 
                   help="restarts for failures other than preemption")
    p.add_argument("--namespace")
    p.add_argument("--workdir", help="container working directory")
    p.add_argument("--jalign", default="jalign", help="the command in the image (default jalign)")
    p.add_argument("--init-timeout", type=int, default=600, 
                   help="JALIGN_INIT_TIMEOUT: seconds to wait for peers")
    p.add_argument("--grace-period", type=int, default=120, 
                   help="terminationGracePeriodSeconds (time to save)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra env var, repeatable")
    p.add_argument("train_args", nargs=argparse.REMAINDER, metavar="CONFIG.gin ... [--gin BINDING ...]")
    a = p.parse_args(argv)
    if a.train_args[:1] == ["--"]:
        a.train_args = a.train_args[1:]
    if not a.train_args or a.train_args[0].startswith("-"):
        p.error("give CONFIG.gin [more.gin ...] [--gin BINDING ...] after the options")
    if a.slices < 1 or (a.nodes is not None and a.nodes < 1):
        p.error("--slices and --nodes must be at least 1")
    try:
        manifest = jobset(a)
    except ValueError as e:
        p.error(str(e))
    print(f"# launch/gke_jobset.py --accelerator {a.accelerator}: kubectl apply -f <this file>")
    print("\n".join(to_yaml(manifest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
