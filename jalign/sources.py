"""Where models come from: a ``ModelSource`` parsed once, and one loader for every caller
(training, evaluation, generation, conversion, reward scoring, the demo, benchmarks).

Sources: ``random`` (the gin model config, freshly initialised), ``hf:PATH_OR_HUB_ID`` (a
Hugging Face safetensors checkpoint), ``gguf:FILE`` (a llama.cpp/Ollama file, dequantised)
and ``jalign:DIR[@STEP]`` (a jalign checkpoint or run directory, its latest step unless
``@STEP``). A run's roles (``jalign.train.roles``) are
read from it by head: the trained role with that head, or a causal LM read as a scalar
head (its LM head dropped, a fresh score). A role whose frozen part was not saved (LoRA
adapters, a trainable regex) is rebuilt from the source its run recorded, checked against
the run's checksums, and joined with the saved part.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jalign import checksum
from jalign.checkpoint import (CheckpointError, latest_step, read_metadata, read_model_config,
                               restore_params)
from jalign.models.adapters import attach, merge
from jalign.models.build import abstract_model, create_model, params_of
from jalign.models.families import architecture_differences
from jalign.models.heads import LM, SCALAR, check_head, fresh_score, scalar_params_from_lm
from jalign.sharding import DEFAULT_RULES, Rules
from jalign.train import roles as R

SCHEMES = ("random", "hf", "jalign", "gguf")
EXECUTION_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl")
_STEP = re.compile(r"^(.*)@(\d+)$")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    scheme: str
    location: str = ""
    step: int | None = None

    @classmethod
    def parse(cls, text: str, *, what: str = "ModelInit.source",
              default_scheme: str | None = None) -> "ModelSource":
        """``random``, ``hf:PATH``, ``jalign:DIR`` or ``jalign:DIR@STEP`` (with
        ``default_scheme``, a bare path is of that scheme). ValueError naming ``what``."""
        text = str(text)
        if text == "random":
            return cls("random")
        scheme, sep, location = text.partition(":")
        if not sep or scheme not in SCHEMES[1:]:
            if default_scheme is None:
                raise ValueError(f"{what}={text!r}: use 'random', 'hf:PATH_OR_HUB_ID', "
                                 "'gguf:FILE' or 'jalign:DIR[@STEP]'")
            scheme, location = default_scheme, text
        if not location:
            raise ValueError(f"{what}={text!r}: no path after '{scheme}:'")
        step = None
        match = _STEP.match(location) if scheme == "jalign" else None
        if match:
            location, step = match.group(1), int(match.group(2))
        return cls(scheme, location, step)

    def __str__(self) -> str:
        if self.scheme == "random":
            return "random"
        return f"{self.scheme}:{self.location}" + (f"@{self.step}" if self.step is not None else "")

    def with_step(self, step: int | None) -> "ModelSource":
        if step is None:
            return self
        if self.scheme != "jalign" or step < 0:
            raise ValueError(f"a checkpoint step ({step}) needs a 'jalign:DIR' source and a "
                             f"step >= 0 (source: {str(self)!r})")
        if self.step is not None and self.step != step:
            raise ValueError(f"source {str(self)!r} names step {self.step}, not {step}")
        return dataclasses.replace(self, step=step)

    def pinned(self) -> "ModelSource":
        """A jalign source with its latest step made explicit (a resumed run or an export
        then rebuilds from the very step the run started from)."""
        if self.scheme != "jalign" or self.step is not None:
            return self
        return dataclasses.replace(self, step=latest_step(self.location))


@dataclasses.dataclass(frozen=True)
class ModelInit:
    """Where a run's model comes from (gin: ``ModelInit.source = 'hf:...'``).

    ``source``: ``random`` (the gin model config), ``hf:PATH_OR_HUB_ID``, ``gguf:FILE``
    (or ``gguf:PACKAGE/FILE``, a file an installed package ships) or ``jalign:DIR[@STEP]``. ``step``: the checkpoint step of a jalign source (also written
    ``@STEP``). Execution fields (dtype, param_dtype, scan_layers, remat_policy,
    attention_impl) of the gin model config apply to every source when
    ``use_execution_config`` is set, so a bf16 run can start from an fp32 checkpoint."""

    source: str = "random"
    seed: int = 0
    use_execution_config: bool = True
    step: int | None = None

    def __post_init__(self):
        self.model_source()  # ValueError naming the binding

    def model_source(self) -> ModelSource:
        parsed = ModelSource.parse(self.source)
        try:
            return parsed.with_step(self.step)
        except ValueError as e:
            raise ValueError(f"ModelInit.step={self.step}: {e}") from None


def execution(config) -> dict:
    """The execution fields of a (gin) model config, applied to a model read elsewhere."""
    return {f: getattr(config, f) for f in EXECUTION_FIELDS}


# ------------------------------------------------------------------ configs without weights

def read_config(source: ModelSource, gin_config=None, overrides: dict | None = None):
    """The plain architecture a source holds (no weights read): the gin config for
    ``random``, config.json for ``hf:``, the checkpoint's for ``jalign:`` (a LoRA run's
    base: its adapters merge into a plain model)."""
    overrides = overrides or {}
    if source.scheme == "random":
        return gin_config.replace(lora=None)
    if source.scheme == "hf":
        from jalign.convert.hf import read_hf_config, resolve_directory
        return read_hf_config(resolve_directory(source.location, config_only=True), **overrides)
    if source.scheme == "gguf":
        from jalign.convert.gguf import GGUFFile, config_from_gguf
        return config_from_gguf(GGUFFile(source.location), **overrides)
    return read_model_config(source.location, source.step).replace(lora=None, **overrides)


# ------------------------------------------------------------------ the loader

def load(source: ModelSource | str, *, head: str = LM, config=None, mesh=None,
         rules: Rules = DEFAULT_RULES, seed: int = 0, overrides: dict | None = None,
         quantize: tuple[str, int] | None = None, adapters: bool = False,
         role: str | None = None):
    """``(config, model)`` of ``source`` with ``head``, placed on ``mesh``.

    ``config``: the architecture of a ``random`` source. ``overrides``: execution fields
    (see ``execution``). ``seed``: a random model's init, or a fresh score head's when a
    causal LM is read as a scalar head. ``quantize=(kind, block_size)``: an ``hf:``
    source is read straight into projection codes (a QLoRA base). ``adapters``: a LoRA
    run's model with its adapters (default: merged into plain weights). ``role``: which
    role of a run (default: the trained role with ``head``)."""
    if isinstance(source, str):
        source = ModelSource.parse(source, what="model source")
    check_head(head)
    overrides = dict(overrides or {})
    if source.scheme == "random":
        cfg = config.replace(lora=None, **overrides)
        return cfg, create_model(cfg, seed=seed, mesh=mesh, rules=rules, head=head)
    if source.scheme in ("hf", "gguf"):
        from jalign.convert.gguf import load_gguf
        from jalign.convert.hf import load_hf
        dtype, compute = overrides.pop("param_dtype", None), overrides.pop("dtype", None)
        loader = load_hf if source.scheme == "hf" else load_gguf
        cfg, model = loader(source.location, mesh=mesh, dtype=dtype, compute_dtype=compute,
                            rules=rules, head=head, seed=seed, quantize=quantize, **overrides)
        return cfg, model
    return load_checkpoint(source.location, step=source.step, head=head, mesh=mesh,
                           rules=rules, seed=seed, adapters=adapters, role=role, **overrides)


def load_checkpoint(directory, *, step: int | None = None, head: str | None = None, mesh=None,
                    rules: Rules = DEFAULT_RULES, seed: int = 0, adapters: bool = False,
                    role: str | None = None, **overrides):
    """``(config, model)`` of a jalign checkpoint or run directory at ``step`` (latest):
    the role ``role``, else the trained role with ``head`` (default: the first trained
    role), else a causal LM read as a scalar head (LM head dropped, score from ``seed``).
    ``overrides``: execution fields; parameter shapes come from the checkpoint."""
    directory = str(directory)
    step = latest_step(directory) if step is None else step
    metadata = read_metadata(directory, step)
    stored = R.stored_roles(metadata)
    name = _pick_role(stored, head, role, directory, step)
    stored_head = stored_role(stored, name).head
    wanted = head or stored_head
    if (stored_head, wanted) == (LM, SCALAR):
        if adapters:
            raise CheckpointError(f"{directory}: a causal LM loads as a scalar head only with "
                                  "its adapters merged (adapters=False)")
        config, lm = load_checkpoint(directory, step=step, mesh=mesh, rules=rules, role=name,
                                     **overrides)
        return config, _scalar_from_lm(lm, seed, mesh, rules)
    if stored_head != wanted:
        raise CheckpointError(f"{directory} step {step} holds a {stored_head}-head model in "
                              f"role {name!r}; it cannot load with head {wanted!r}")
    stored_config = read_model_config(directory, step)
    config = stored_config.replace(**overrides)
    models = stored.run_models(config)
    tree = RoleRestorer(directory, step, metadata, stored, models, stored_config, mesh,
                        rules).full_tree(name)
    graphdef, abstract = abstract_model(models.configs[name], mesh, rules, head=stored_head)
    nnx.replace_by_pure_dict(abstract, tree)
    model = nnx.merge(graphdef, abstract)
    if config.lora is not None and not adapters:
        model = merge(model)
    return model.config, model


def stored_role(stored: R.StoredRoles, name: str) -> R.Role:
    return next(r for r in stored.roles if r.name == name)


def _pick_role(stored: R.StoredRoles, head, role, directory, step) -> str:
    names = [r.name for r in stored.roles]
    if role is not None:
        if role not in names:
            raise CheckpointError(f"{directory} step {step} has no role {role!r}; it holds "
                                  f"{names}")
        return role
    trained = [r for r in stored.roles if r.trained]
    for r in trained:
        if head is None or r.head == head:
            return r.name
    lms = [r for r in trained if r.head == LM]
    if head == SCALAR and lms:
        return lms[0].name
    raise CheckpointError(f"{directory} step {step} holds "
                          + ", ".join(f"{r.name} ({r.head} head)" for r in trained)
                          + f"; none loads with head {head!r}")


def _scalar_from_lm(lm, seed: int, mesh, rules):
    """A scalar-head model on ``lm``'s backbone with a fresh score (a reward model started
    from a causal LM)."""
    graphdef, abstract = abstract_model(lm.config, mesh, rules, head=SCALAR)
    score = fresh_score(lm.config, seed)
    if mesh is not None:
        score = jax.device_put(score, abstract["score"].sharding)
    nnx.replace_by_pure_dict(abstract, scalar_params_from_lm(params_of(lm), score))
    return nnx.merge(graphdef, abstract)


# ------------------------------------------------------------------ a run's roles on disk

class RoleRestorer:
    """Reads the roles of one checkpoint step: the saved (trained) parts from the params
    item, the unsaved fixed parts rebuilt from the sources the run recorded and checked
    against the step's checksums."""

    def __init__(self, directory, step: int, metadata: dict, stored: R.StoredRoles,
                 models: R.RunModels, stored_config, mesh, rules: Rules):
        self.directory, self.step, self.metadata = directory, step, metadata
        self.stored, self.models, self.mesh, self.rules = stored, models, mesh, rules
        self.stored_dtype = jnp.dtype(stored_config.param_dtype)
        self._saved = None

    def saved(self) -> dict:
        """{role: trained part} of every trained role, from the params item."""
        if self._saved is None:
            stored, wanted = {}, {}
            for r in self.stored.roles:
                if r.trained:
                    stored[r.name], wanted[r.name] = self._abstract_part(r.name)
            bare = self.stored.bare
            item = stored[next(iter(stored))] if bare else stored
            restored = restore_params(self.directory, self.step, item, self.metadata)
            restored = {next(iter(stored)): restored} if bare else restored
            # Read as stored (what the checksums describe), verified, then cast: a bf16
            # checkpoint may start a float32 run and the other way round.
            self._saved = {n: _cast_like(restored[n], wanted[n]) for n in stored}
        return self._saved

    def _abstract_part(self, name: str) -> tuple[dict, dict]:
        """(as stored, as wanted): the trained part of role ``name`` as ShapeDtypeStructs in
        the stored parameter dtype and in the model config's."""
        role = self.models.role(name)
        _, abstract = abstract_model(self.models.configs[name], self.mesh, self.rules,
                                     head=role.head)
        tree = nnx.to_pure_dict(abstract)
        trained, _ = R.split(tree, role.trains, R.regex_prefix(self.models.roles, name))
        device = None if self.mesh is not None else jax.sharding.SingleDeviceSharding(
            jax.devices()[0])
        weight = jnp.dtype(self.models.configs[name].param_dtype)

        def leaf(a):  # parameters of the param dtype are read as stored, then cast
            dtype = self.stored_dtype if a.dtype == weight else a.dtype
            return jax.ShapeDtypeStruct(a.shape, dtype, sharding=device or a.sharding)

        return jax.tree.map(leaf, trained), trained

    def fixed(self, names, initial=None) -> dict:
        """{role: fixed part} of the roles ``names`` (those with a part of their own),
        rebuilt from their sources and checked against the step's checksums."""
        initial = initial or InitialModels(self.models, self.stored.records,
                                           mesh=self.mesh, rules=self.rules)
        expected = R.fixed_checksums(self.metadata, self.stored)
        out = {}
        for name in names:
            fixed, bad = rebuilt_fixed_part(self.models, initial, name, expected)
            if bad:
                source = str(initial.source_of(name)[0])
                raise CheckpointError(
                    f"{self.directory} step {self.step}: role {name!r}'s frozen part, rebuilt "
                    f"from {source!r}, differs from the one the run trained with ({len(bad)} "
                    f"arrays, e.g. {bad[:2]}): the source changed since; restore it")
            out[name] = fixed
        return out

    def full_tree(self, name: str) -> dict:
        """Role ``name``'s full parameter tree at this step."""
        needed = {name} | ({self.models.views[name][0]} if name in self.models.views else set())
        own = [n for n in needed if n in self.models.stored_fixed]
        fixed = self.fixed(own) if own else {}
        saved = self.saved() if self.models.role(name).trained else {}
        return self.models.tree(name, saved, fixed)


def rebuilt_fixed_part(models: R.RunModels, initial: "InitialModels", name: str,
                       expected: dict) -> tuple[dict, list[str]]:
    """(fixed part of role ``name`` rebuilt from its initial model, the arrays whose
    checksums differ from ``expected``, {'role/path': checksum}; none recorded: [])."""
    _, fixed = models.split(name, initial.full_tree(name))
    mine = {k[len(name) + 1:]: v for k, v in expected.items() if k.startswith(name + "/")}
    return fixed, (checksum.mismatches(mine, fixed) if mine else [])


def _cast_like(tree, target):
    return jax.tree.map(lambda x, t: x.astype(t.dtype) if x.dtype != t.dtype else x, tree,
                        target)


# ------------------------------------------------------------------ a run's initial models

class InitialModels:
    """Each role's initial model, loaded once: from its source (``records[name]['source']``,
    or ``default`` for roles without one), with its head, a LoRA role with fresh adapters
    attached (and its base quantised as ``LoraConfig.quantize`` says). A role ``like``
    another with the same head is that role's initial model; with another head it is that
    role's source read with its own."""

    def __init__(self, models: R.RunModels, records: dict, *, default: ModelSource | None = None,
                 gin_config=None, overrides: dict | None = None, mesh=None,
                 rules: Rules = DEFAULT_RULES):
        self.models, self.records, self.default = models, records, default
        self.gin_config, self.overrides = gin_config, overrides
        self.mesh, self.rules = mesh, rules
        self._plain: dict = {}
        self._models: dict = {}

    def source_of(self, name: str) -> tuple[ModelSource, int, dict | None]:
        """(source, seed, execution overrides) role ``name`` is read from."""
        role = self.models.role(name)
        if role.like is not None:
            source, seed, overrides = self.source_of(role.like)
            return source, self.records.get(name, {}).get("seed", seed), overrides
        rec = self.records.get(name, {})
        text = rec.get("source") or role.source
        source = ModelSource.parse(text, what=f"role {name!r} source") if text else self.default
        if source is None:
            raise CheckpointError(f"role {name!r}: no recorded source to rebuild it from")
        overrides = self.overrides
        if overrides is None:  # a recorded run: the execution fields it ran with
            cfg = self.models.configs[name]
            overrides = execution(cfg) if rec.get("use_execution_config", True) else {}
        return source, rec.get("seed", 0), overrides

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = self._build(name)
        return self._models[name]

    def full_tree(self, name: str) -> dict:
        return params_of(self.model(name))

    def _build(self, name: str):
        role = self.models.role(name)
        like = self.models.role(role.like) if role.like is not None else None
        if like is not None and like.head == role.head and role.trains != R.ADAPTERS:
            return self.model(like.name) if like.trains != R.ADAPTERS else self._plain_model(
                like.name, like.head)
        if role.trains != R.ADAPTERS:
            return self._plain_model(name, role.head)
        # attach() consumes the model it is given (its kept weights donated, the ones it
        # quantises freed): a model of this role's own, never one another role reads.
        model = self._plain_model(name, role.head, keep=False)
        adapter_roles = [r.name for r in self.models.roles if r.trains == R.ADAPTERS]
        # Each adapter set its own random A (the first keeps the run's seed).
        seed = self.source_of(name)[1] + 1_000_003 * adapter_roles.index(name)
        return attach(model, self.models.configs[name].lora, seed=seed, mesh=self.mesh,
                      rules=self.rules)

    def _plain_model(self, name: str, head: str, keep: bool = True):
        """Role ``name``'s source read with ``head``, without adapters (memoised unless
        not ``keep``)."""
        source, seed, overrides = self.source_of(name)
        lora = self.models.configs[name].lora
        quantize = (lora.quantize, lora.block_size) if lora and lora.quantize else None
        key = (str(source), head, seed, quantize)
        if key in self._plain:
            return self._plain[key]
        config = self.gin_config or self.models.configs[name]
        cfg, model = load(source, head=head, config=config, mesh=self.mesh, rules=self.rules,
                          seed=seed, overrides=overrides, quantize=quantize)
        self._check_architecture(name, cfg)
        if keep:
            self._plain[key] = model
        return model

    def _check_architecture(self, name: str, cfg) -> None:
        differ = architecture_differences(cfg, self.models.configs[name])
        if differ:
            raise ValueError(f"role {name!r}: its source {str(self.source_of(name)[0])!r} "
                             f"has another architecture than the run's model "
                             f"({'; '.join(differ)})")

    def clear(self) -> None:
        self._plain.clear()
        self._models.clear()


def describe(source: ModelSource) -> str:
    """A short name for messages and PEFT's ``base_model_name_or_path``: an HF path or hub
    id as given; other sources as written."""
    return source.location if source.scheme == "hf" else str(source)


# ------------------------------------------------------------------ the model's tokenizer

TOKENIZER_DIR = "tokenizer"  # where a run (or a converted checkpoint) keeps its tokenizer
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_spec(source: ModelSource | str) -> str:
    """The tokenizer that comes with a model source (a ``load_tokenizer`` argument): a
    ``random`` model's is the bundled one; an ``hf:`` checkpoint's its own files (a hub id:
    its repo); a ``gguf:`` file's the one its metadata describes; a ``jalign:`` run's the
    one it trained with (``DIR/tokenizer``; runs written before they kept one: the
    ``DataConfig.tokenizer`` they recorded, the bundled one if none). ValueError when the
    source has none (an HF directory without tokenizer files)."""
    from pathlib import Path
    if isinstance(source, str):
        source = ModelSource.parse(source, what="model source")
    if source.scheme == "random":
        return "bundled"
    if source.scheme == "gguf":
        return f"gguf:{source.location}"
    path = Path(source.location)
    if source.scheme == "hf":
        if not path.exists():
            return source.location  # a hub id: its repo's tokenizer
        if any((path / f).exists() for f in _TOKENIZER_FILES):
            return str(path)
        raise ValueError(f"hf:{source.location} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})"
                         "; name the tokenizer to use (a directory, a hub id, gguf:FILE or "
                         "'bundled')")
    if (path / TOKENIZER_DIR).is_dir():
        return str(path / TOKENIZER_DIR)
    return _recorded_tokenizer(source) or "bundled"


def _recorded_tokenizer(source: ModelSource) -> str | None:
    """The DataConfig.tokenizer a run recorded (runs that kept no tokenizer of their own)."""
    from jalign.checkpoint import read_config_record
    try:
        record = read_config_record(source.location, source.step) or {}
    except (CheckpointError, OSError, ValueError):
        return None
    return record.get("DataConfig.tokenizer")
