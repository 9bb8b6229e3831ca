"""The precomputed-reference cache: reused for the same data and model, recomputed when
either changes, never half-written."""

import jax
import jax.numpy as jnp
import numpy as np

from jalign.models.build import create_model
from jalign.models.config import preset
from jalign.sharding import MeshConfig, make_mesh
from jalign.train.reference import annotate
from tests.numerics import assert_f32_close


def _examples(n=5):
    rng = np.random.default_rng(0)
    return [{"prompt_ids": rng.integers(3, 100, 4).astype(np.int32),
             "chosen_ids": rng.integers(3, 100, 3).astype(np.int32),
             "rejected_ids": rng.integers(3, 100, 2).astype(np.int32), "record_index": i}
            for i in range(n)]


def _score(model, batch):  # a cheap score that still depends on the model and every row
    w = model.embed_tokens(batch["chosen_input_ids"]).sum(axis=(1, 2))
    return {"ref_chosen_logps": w, "ref_rejected_logps": -w}


def test_cache_reuse_and_invalidation(tmp_path):
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    loads = []

    def loader(seed):
        def load():
            loads.append(seed)
            return create_model(preset("tiny", vocab_size=128), seed=seed)
        return load

    def run(examples, seed, key):
        return annotate(examples, cache_path=tmp_path / "ref.npz", load_model=loader(seed),
                        score_fn=_score, rows=2, length=12, pad_id=0, mesh=mesh, model_key=key)

    first = _examples()
    assert run(first, 0, "model-a") == {"cached": False, "examples": 5}
    again = _examples()
    assert run(again, 0, "model-a")["cached"] and loads == [0]
    for a, b in zip(first, again):
        # exact by construction: the second run reads back the values the first one stored
        assert a["ref_chosen_logps"] == b["ref_chosen_logps"]
    # Another reference model: recomputed, different values.
    other = _examples()
    assert not run(other, 1, "model-b")["cached"]
    assert other[0]["ref_chosen_logps"] != first[0]["ref_chosen_logps"]
    # Other data: recomputed.
    changed = _examples()
    changed[2]["chosen_ids"] = changed[2]["chosen_ids"] + 1
    assert not run(changed, 1, "model-b")["cached"] and loads == [0, 1, 1]
    assert not list(tmp_path.glob("*.tmp*"))
    # The values are the score of each example's own padded row (last batch padded, cut).
    row = np.concatenate([changed[4]["prompt_ids"], changed[4]["chosen_ids"], np.zeros(5, np.int32)])
    embeds = create_model(preset("tiny", vocab_size=128), seed=1).embed_tokens(jnp.asarray(row[None]))
    expected = float(jnp.sum(embeds))
    # Another program sums the same 12 x 64 embedding entries (in a batch of 2 rows): a
    # 768-term sum, on the scale of their absolute values.
    assert_f32_close(changed[4]["ref_chosen_logps"], expected, terms=embeds.size,
                     scale=float(np.abs(np.asarray(embeds)).sum()))
