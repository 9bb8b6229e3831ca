"""Per-device memory of a full fine-tuning train step, planned without the hardware.

``plan(config, mesh_config, num_devices, batch=..., seq_len=...)`` adds up what one device
holds during ``jalign.train.step.make_train_step`` with an SFT-style loss, in bytes:

state (the step's arguments; donated, so the new state reuses them)
  ``params``      each parameter's shard on the mesh, in ``param_dtype``.
  ``opt_state``   the optimizer's state from ``optax`` ``init`` (AdamW: mu and nu in the
                  parameter dtype), sharded like the parameters, and the train state's
                  step / rng / skip counters.
  Both come from ``jalign.train.setup.abstract_train_state`` on an abstract mesh: the
  run's own shardings, so a dim that a mesh axis does not divide (8 KV heads on a
  16-way tensor axis) is replicated along it and counted whole.

temporaries (the compiled step's scratch)
  ``grads``       float32 gradients (the step differentiates through a float32 view of
                  every parameter) and the optimizer's float32 updates before they are
                  added: 2 x 4 bytes per parameter element of the shard (on TPU one:
                  XLA:TPU fuses the update into the gradient's buffer; ``TPU``).
  ``copies``      the compute-dtype cast of every parameter when ``dtype != param_dtype``
                  (the stacked layer weights are cast before the layer scan, and the
                  backward scan reads the cast again), plus with ``fsdp > 1`` the largest
                  weight all-gathered at once (``_gathered``) in the compute dtype with
                  its float32 gradient before the reduce-scatter (not on TPU slices of
                  up to 16 fsdp chips, whose windowed matmuls never gather a weight whole).
  ``activations`` what the forward keeps for the backward: ``num_layers`` x the
                  per-layer residuals of the remat policy (``layer_residuals``) + 4
                  [tokens, embed] tensors outside the layers (embedding output, final
                  norm, hidden states).
  ``recompute``   what is live while the backward works through one layer
                  (``layer_backward``).
  ``logits``      the loss's float32 logits and their gradient: 2 x [rows, vocab / tensor]
                  x 4 bytes. jalign's losses project about ``chunk_tokens`` of each
                  device's own tokens at a time, so rows = min(tokens, chunk)
                  (``logits='chunked'``), or all of them where their logits fit
                  ``jalign.losses.sft.KEEP_LOGITS_BYTES``; ``logits='full'``: a loss that
                  materialises [batch, seq, vocab].

Tokens are per batch shard: ``batch`` rows of ``seq_len`` on each data x fsdp shard (the
micro-batch; a global batch of ``batch x data x fsdp`` rows per accumulation step).
Devices along ``tensor`` share those rows and split heads, mlp and vocab.

Not counted: XLA's fragmentation and collective buffers, the int32 batch, the program,
frozen models (DPO/PPO's reference: add ``params`` in its dtype), LoRA (this is full
fine-tuning), and on GPU the memory JAX leaves unallocated (by default it takes 75% of
the device: set ``XLA_PYTHON_CLIENT_MEM_FRACTION``). ``check`` compares the plan with
the compiled step at small shapes on CPU (docs/memory_plan.md).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from jalign.chips import CHIPS as TPU_CHIPS, GiB
from jalign.models.families import default_config_class, family_of
from jalign.sharding import DEFAULT_RULES, MeshConfig, Rules, abstract_mesh, logical_to_spec

PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device, by part (see the module docstring)."""

    params: int
    opt_state: int
    grads: int
    copies: int
    activations: int
    recompute: int
    logits: int

    @property
    def state(self) -> int:
        return self.params + self.opt_state

    @property
    def temporaries(self) -> int:
        return self.grads + self.copies + self.activations + self.recompute + self.logits

    @property
    def total(self) -> int:
        return self.state + self.temporaries


def _shard_elements(shape, logical, mesh, rules: Rules) -> int:
    spec = logical_to_spec(logical, shape, mesh, rules)
    return math.prod(jax.sharding.NamedSharding(mesh, spec).shard_shape(tuple(shape)))


def _split(size: int, logical: str, mesh, rules: Rules) -> int:
    """``size`` divided by the mesh axes its logical name shards over (if they divide)."""
    return _shard_elements((size,), (logical,), mesh, rules)


def _nbytes(tree) -> int:
    """Per-device bytes of a tree of ShapeDtypeStructs carrying shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def state_bytes(config, mesh, optimizer=None, rules: Rules = DEFAULT_RULES):
    """(params, the rest of the train state, params' elements) per device, from the
    abstract train state: the same shardings the run places them with. The rest is the
    optimizer's state plus the state's step, rng and skip counters (16 bytes)."""
    from jalign.train.optimizer import OptimizerConfig
    from jalign.train.roles import RunModels
    from jalign.train.state_init import abstract_train_state, build_optimizer
    models = RunModels.single(config)
    tx, _ = build_optimizer(optimizer or OptimizerConfig(), models, 1)
    state, _ = abstract_train_state(models, tx, mesh, rules)
    elements = sum(math.prod(x.sharding.shard_shape(x.shape))
                   for x in jax.tree.leaves(state.params))
    params = _nbytes(state.params)
    return params, _nbytes(state) - params, elements


def resolve_attention(config, platform: str) -> str:
    """The attention path a run on ``platform`` takes (``jalign.models.attention``'s
    ``auto``: splash on TPU, cuDNN on GPU, blockwise on CPU). The fused kernels keep a
    log-sum-exp per query, never [heads, seq, seq] scores."""
    from jalign.models.attention import resolve_impl
    if config.attention_impl == "auto":
        return resolve_impl("auto", platform)
    if config.attention_impl == "cudnn" and platform != "gpu":
        return "xla"  # jax.nn.dot_product_attention's XLA path: it materialises the scores
    return config.attention_impl


def _dims(config, mesh, rules: Rules):
    """(c, d, h, n, q, kv, f): the compute dtype's size, hidden, head_dim, and the query
    heads, query / key-value widths (heads x head_dim) and mlp width on one device."""
    h = config.resolved_head_dim
    n = _split(config.num_heads, "q_heads", mesh, rules)
    kv = _split(config.num_kv_heads, "kv_heads", mesh, rules) * h
    return (config.compute_dtype.itemsize, config.hidden_size, h, n, n * h, kv,
            _split(config.intermediate_size, "mlp", mesh, rules))


def _blocks(dims, seq_len: int, xla: bool, score_bytes: int) -> tuple[float, float]:
    """(attention block, MLP block) bytes per token that a layer saves with no remat;
    ``score_bytes`` per [query head, key] score element on the XLA attention path."""
    c, d, h, n, q, kv, f = dims
    upcast = 4 * d if c < 4 else 0  # an RMSNorm's float32 copy of its input
    scores = (score_bytes + (c if c < 4 else 0)) * n * seq_len if xla else 4 * n
    attention = c * (d + 2 * d + q + 2 * kv + 4 * h + q) + upcast + scores
    mlp = c * (d + 2 * d + 6 * f) + upcast
    return attention, mlp


def layer_residuals(config, mesh, seq_len: int, policy: str | None = None,
                    attention: str = "xla", rules: Rules = DEFAULT_RULES) -> float:
    """Bytes per token (per device) one decoder layer keeps for the backward under a
    remat policy. c = the compute dtype's size, d = hidden, f = mlp, q / kv = query /
    key-value heads x head_dim, n = query heads, S = seq_len; f, q, kv and n split over
    ``tensor`` where the rules shard them and the axis divides. Under ``lax.scan`` every
    residual is a stacked scan output, so the count is what autodiff names (as
    ``jax.ad_checkpoint.print_saved_residuals`` lists them, reshapes of one buffer once):

    ``none``   c·(d layer input + 2·2d two RMSNorms (normalised, scaled) + q + 2kv (q, k
               after RoPE, v) + 4·head_dim (RoPE cos/sin) + q attention output + d
               residual sum + 6f (gate, up, three silu intermediates, their product))
               + 4d per RMSNorm when c < 4 (its float32 upcast) + the attention's: XLA
               path 13·n·S (masked scores, exp and probabilities in float32, the boolean
               mask; + c·n·S for the cast probabilities when c < 4), cuDNN 4·n (its
               log-sum-exp).
    ``dots``   the matmul outputs: c·(d input + q + 2kv + q attention output + d output
               projection + 2f gate and up) + 4·n·S float32 scores; with cuDNN attention
               (no matmul to this policy: recomputed) as ``dots_no_batch``.
    ``dots_no_batch``  matmuls without batch dims, i.e. the projections but not the
               attention einsums: c·(d + q + 2kv + d + 2f).
    ``full``   the layer input: c·d.
    """
    policy = policy or config.remat_policy
    dims = _dims(config, mesh, rules)
    c, d, h, n, q, kv, f = dims
    if policy == "full":
        return c * d
    if policy == "dots_no_batch":
        return c * (d + q + 2 * kv + d + 2 * f)
    if policy == "dots":
        if attention != "xla":  # no attention einsums: the projections only
            return c * (d + q + 2 * kv + d + 2 * f)
        return c * (d + q + 2 * kv + q + d + 2 * f) + 4 * n * seq_len
    if policy != "none":
        raise ValueError(f"unknown remat policy {policy!r}")
    return sum(_blocks(dims, seq_len, attention == "xla", score_bytes=13))


def layer_backward(config, mesh, seq_len: int, attention: str = "xla",
                   rules: Rules = DEFAULT_RULES, score_bytes: int = 16) -> float:
    """Bytes per token live while the backward works through one layer: the larger of
    its attention and MLP blocks (differentiated one after the other), each as large as
    its no-remat residuals (a remat policy recomputes them; without one they stand for
    the gradients of as large tensors), with 16 bytes per score element on the XLA
    attention path: four float32 [heads, seq, seq] buffers are live in the attention's
    backward (probabilities, their gradient, the scores' gradient, a relayout for a
    matmul), measured in the compiled step on CPU (XLA:TPU: one, ``TPU``)."""
    return max(_blocks(_dims(config, mesh, rules), seq_len, attention == "xla",
                       score_bytes=score_bytes))


# What XLA:TPU does otherwise than XLA:CPU, from the compiled TPU steps of docs/tpu.md
# (fitted on Llama 3.1 8B SFT on v5e:4x4, xla and splash attention; checked on the other
# rows there): the optimizer's float32 update is fused into the gradient (one float32
# buffer per parameter, not two); the XLA attention's backward keeps one float32 [heads,
# seq, seq] buffer, not four; and on up to 16 fsdp chips the FSDP matmuls run windowed
# (collective matmuls: no weight gathered whole), while on 64 and more XLA gathers whole
# weights (and the head) as on CPU. 32 chips were not compiled: planned as gathered.
TPU = {"grad_buffers": 1, "windowed_fsdp": 16, "score_bytes": 4}
CPU = {"grad_buffers": 2, "windowed_fsdp": 0, "score_bytes": 16}


def _without_fsdp(rules: Rules) -> Rules:
    def drop(axes):
        if axes is None or isinstance(axes, str):
            return None if axes == "fsdp" else axes
        return tuple(a for a in axes if a != "fsdp") or None
    return tuple((name, drop(axes)) for name, axes in rules)


def _gathered(config, mesh, rules: Rules) -> int:
    """Elements (per device) of the largest weight gathered over fsdp at once: one
    layer's weights, or the LM head where it is gathered; still split over tensor."""
    if mesh.shape["fsdp"] == 1:
        return 0
    family = family_of(config)
    layer_axes, layer_shapes = family.layer_axes, family.layer_shapes
    no_fsdp = _without_fsdp(rules)
    axes = layer_axes(config)
    layer = sum(_shard_elements(s, axes[k], mesh, no_fsdp)
                for k, s in layer_shapes(config).items())
    head = 0
    # The loss's chunks run over each device's own rows against the whole [embed, vocab /
    # tensor] head, which XLA therefore gathers over fsdp (as compiled, jax 0.10).
    if mesh.shape["fsdp"] > 1:
        head = _shard_elements((config.hidden_size, config.vocab_size), ("embed", "vocab"),
                               mesh, no_fsdp)
    return max(layer, head)


def plan(config, mesh_config: MeshConfig, num_devices: int, *, batch: int,
         seq_len: int, platform: str = "tpu", optimizer=None, chunk_tokens: int = 2048,
         logits: str = "chunked", rules: Rules = DEFAULT_RULES) -> Plan:
    """Bytes per device of one train step (module docstring). ``batch``: rows per
    data x fsdp shard; ``platform`` decides what ``attention_impl='auto'`` runs. Layers
    are taken as scanned (``scan_layers``, the default): unrolled, XLA:CPU's scratch
    measured ~1.2x this plan's temporaries."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r}; one of {PLATFORMS}")
    if logits not in ("chunked", "full"):
        raise ValueError(f"logits={logits!r}; 'chunked' or 'full'")
    mesh = abstract_mesh(mesh_config, num_devices)
    params, opt_state, elements = state_bytes(config, mesh, optimizer, rules)
    compiler = TPU if platform == "tpu" else CPU
    c = config.compute_dtype.itemsize
    copies = elements * c if config.dtype != config.param_dtype else 0
    if mesh.shape["fsdp"] > compiler["windowed_fsdp"]:
        copies += _gathered(config, mesh, rules) * (c + 4)
    tokens = batch * seq_len
    attention = resolve_attention(config, platform)
    per_layer = layer_residuals(config, mesh, seq_len, attention=attention, rules=rules)
    outside = 4 * config.hidden_size * c  # embedding output, final norm (2), hidden states
    activations = int(tokens * (config.num_layers * per_layer + outside))
    recompute = int(tokens * layer_backward(config, mesh, seq_len, attention, rules,
                                            compiler["score_bytes"]))
    vocab = _split(config.vocab_size, "act_vocab", mesh, rules)
    # the loss's chunks run along each device's own rows (jalign.losses.sft); logits that
    # fit its budget are kept whole
    from jalign.losses.sft import KEEP_LOGITS_BYTES, LOGITS_KEPT_PER_VOCAB
    kept = tokens * LOGITS_KEPT_PER_VOCAB * config.vocab_size <= KEEP_LOGITS_BYTES
    rows = tokens if logits == "full" or kept else min(tokens, chunk_tokens)
    return Plan(params, opt_state, compiler["grad_buffers"] * 4 * elements, copies,
                activations, recompute,
                2 * 4 * rows * vocab)


def max_batch(config, mesh_config: MeshConfig, num_devices: int, *, seq_len: int,
              hbm_bytes: int, headroom: float = 0.9, **kw) -> int:
    """The most rows per batch shard whose plan fits in ``headroom`` of ``hbm_bytes``
    (0: not even one)."""
    best, b = 0, 1
    while plan(config, mesh_config, num_devices, batch=b, seq_len=seq_len, **kw).total \
            <= headroom * hbm_bytes:
        best, b = b, b * 2
        if b > 4096:
            break
    return best


# ---------------------------------------------------------------- hardware configs

# Per-chip HBM by hardware-config name prefix (the longest prefix that matches wins).
CHIPS: dict[str, tuple[str, str, float]] = {  # prefix -> (platform, chip, HBM GiB)
    "gpu": ("gpu", "H100", 80.0),
    # TPU generations from jalign.chips (one table of chip numbers, with sources)
    **{f"tpu_{name}": ("tpu", name, chip.hbm_bytes / GiB) for name, chip in TPU_CHIPS.items()},
}

# Llama 3.1 8B and 70B, by hand (the architecture only; execution fields come from the
# hardware config).
LLAMA3_1 = dict(vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072)
ModelConfig = default_config_class()  # the planned shapes are the default family's
MODELS: dict = {
    "8B": ModelConfig(**LLAMA3_1, hidden_size=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, intermediate_size=14336),
    "70B": ModelConfig(**LLAMA3_1, hidden_size=8192, num_layers=80, num_heads=64,
                       num_kv_heads=8, intermediate_size=28672),
}


def chip(hw_name: str) -> tuple[str, str, float]:
    """(platform, chip, HBM GiB) of a configs/hw file's stem, e.g. ``tpu_v5e_16``."""
    matches = [k for k in CHIPS if hw_name == k or hw_name.startswith(k + "_")]
    if not matches:
        raise KeyError(f"no chip known for hardware config {hw_name!r}; add its prefix to "
                       f"jalign.memory_plan.CHIPS (known: {sorted(CHIPS)})")
    return CHIPS[max(matches, key=len)]


def read_hw(path) -> tuple:
    """(MeshConfig, the model config with the file's bindings over the defaults) of a hardware
    config, parsed by jalign's own gin loading."""
    from jalign import config as jconfig
    jconfig.parse([path])
    return jconfig.build("MeshConfig"), jconfig.model_config()


def with_execution(model, hw_config):
    """``model``'s architecture with the hardware config's dtypes, remat and attention."""
    from jalign.sources import EXECUTION_FIELDS
    return model.replace(**{f: getattr(hw_config, f) for f in EXECUTION_FIELDS})


# --------------------------------------------------------------------- compiled check

def compiled_step_memory(config, mesh_config: MeshConfig, *, batch: int,
                         seq_len: int, optimizer=None, chunk_tokens: int = 2048,
                         devices=None) -> dict:
    """The compiled SFT train step's ``memory_analysis()`` on this machine's devices (a
    small shape: this compiles the real step). Sizes are per device (SPMD)."""
    from jalign.losses.sft import sft_loss
    from jalign.sharding import make_mesh
    from jalign.train.optimizer import OptimizerConfig
    from jalign.train.roles import RunModels
    from jalign.train.state_init import abstract_train_state, build_optimizer
    from jalign.train.step import make_train_step

    devices = list(devices if devices is not None else jax.devices())
    mesh = make_mesh(mesh_config, devices)
    models = RunModels.single(config)
    tx, _ = build_optimizer(optimizer or OptimizerConfig(), models, 1)
    state, sh = abstract_train_state(models, tx, mesh, DEFAULT_RULES)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = batch * shards

    def loss(ms, b, ctx):
        return sft_loss(ms["policy"], b, ctx, chunk_tokens=chunk_tokens)

    step = make_train_step(loss, tx, models, mesh=mesh, state_sharding=sh, global_batch=rows)
    ids = jax.ShapeDtypeStruct((rows, seq_len), np.int32)
    batch_abs = {k: ids for k in ("input_ids", "loss_mask", "segment_ids", "positions")}
    ma = step.lower(state, batch_abs).compile().memory_analysis()
    out = {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                            "alias_size_in_bytes", "temp_size_in_bytes")}
    out["batch_bytes"] = 4 * 4 * batch * seq_len  # four int32 [rows, seq] inputs, per shard
    return out


# The small shapes the plan is checked on (8 host devices): float32, because XLA:CPU
# computes bfloat16 matmuls in float32 (its scratch would hold float32 copies that a
# GPU or TPU does not make). ``none`` and ``full`` of one shape differ only in the
# activations: their difference checks the activation count alone.
CHECK_MODEL = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                          num_layers=4, num_heads=8, num_kv_heads=4,
                          max_position_embeddings=4096, attention_impl="xla")
CHECK_CASES: dict[str, tuple] = {
    # name: (config, mesh, rows per batch shard, seq_len)
    "fsdp8 none": (CHECK_MODEL, MeshConfig(1, 8, 1), 2, 256),
    "fsdp8 full": (CHECK_MODEL.replace(remat_policy="full"), MeshConfig(1, 8, 1), 2, 256),
    "fsdp4 tp2 dots": (CHECK_MODEL.replace(remat_policy="dots"), MeshConfig(1, 4, 2), 2, 256),
    "data2 fsdp4 dots_no_batch": (CHECK_MODEL.replace(remat_policy="dots_no_batch"),
                                  MeshConfig(2, 4, 1), 2, 256),
    "tp8 dots": (CHECK_MODEL.replace(remat_policy="dots"), MeshConfig(1, 1, 8), 2, 256),
    "fsdp8 full seq 1024": (CHECK_MODEL.replace(remat_policy="full"), MeshConfig(1, 8, 1), 1,
                            1024),
    "fsdp8 full vocab 16k": (CHECK_MODEL.replace(remat_policy="full", vocab_size=16384,
                                                 num_layers=2), MeshConfig(1, 8, 1), 2, 256),
}
# Compiled scratch / planned temporaries must lie in this range. The plan may overstate
# (XLA fuses away about a fifth of the residuals autodiff names, and frees a layer's
# recomputed tensors sooner than "its larger block at once"): measured 0.57-0.96 on these
# shapes. It must not understate by more than a quarter: a plan that says "fits" should.
TEMP_RATIO = (0.5, 1.25)


def check(names=None, devices=None) -> list[dict]:
    """Plan vs compiled ``memory_analysis()`` for ``CHECK_CASES`` (``names``: a subset).
    Each row: planned and compiled state (arguments less the batch) and temporaries, and
    their ratio; ``ok`` when the state matches to the byte and the ratio is in TEMP_RATIO."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < 8:
        raise RuntimeError(f"the memory-plan check needs 8 devices, has {len(devices)}: set "
                           "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax loads")
    rows = []
    for name in names or CHECK_CASES:
        config, mesh_config, batch, seq = CHECK_CASES[name]
        planned = plan(config, mesh_config, 8, batch=batch, seq_len=seq, platform="cpu")
        compiled = compiled_step_memory(config, mesh_config, batch=batch, seq_len=seq,
                                        devices=devices[:8])
        state = compiled["argument_size_in_bytes"] - compiled["batch_bytes"]
        ratio = compiled["temp_size_in_bytes"] / planned.temporaries
        rows.append(dict(name=name, plan=planned, planned_state=planned.state,
                         compiled_state=state, planned_temp=planned.temporaries,
                         compiled_temp=compiled["temp_size_in_bytes"], ratio=ratio,
                         ok=state == planned.state and TEMP_RATIO[0] <= ratio <= TEMP_RATIO[1]))
    return rows


def activation_check(rows: list[dict], none: str = "fsdp8 none", full: str = "fsdp8 full"):
    """(planned, compiled) difference in temporaries between a shape's ``none`` and
    ``full`` remat rows: the activations the policies differ by, all else alike."""
    by = {r["name"]: r for r in rows}
    return (by[none]["planned_temp"] - by[full]["planned_temp"],
            by[none]["compiled_temp"] - by[full]["compiled_temp"])

