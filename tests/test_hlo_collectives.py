"""Collectives read from optimized HLO: counted once per loop trip, bytes by hand."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jalign.hlo_collectives import collectives, ici_bytes


def _scanned_gather(layers: int):
    """A scan over ``layers`` weights sharded 8 ways whose body all-gathers its weight
    (explicitly, in shard_map: the compiler cannot choose another collective)."""
    mesh = jax.make_mesh((8,), ("x",), devices=jax.devices()[:8])

    def body(h, wi):
        return jnp.tanh(h @ jax.lax.all_gather(wi, "x", axis=0, tiled=True)), None

    def f(w, x):
        return jax.lax.scan(body, x, w)[0]

    sharded = jax.shard_map(f, mesh=mesh, in_specs=(P(None, "x", None), P()), out_specs=P(),
                            check_vma=False)
    w = jax.ShapeDtypeStruct((layers, 64, 64), jnp.float32,
                             sharding=NamedSharding(mesh, P(None, "x", None)))
    x = jax.ShapeDtypeStruct((4, 64), jnp.float32, sharding=NamedSharding(mesh, P()))
    return jax.jit(sharded).lower(w, x).compile().as_text()


def test_a_gather_in_a_scanned_body_counts_once_per_trip():
    one, five = collectives(_scanned_gather(1)), collectives(_scanned_gather(5))
    # Each trip gathers one whole [64, 64] float32 weight: 16 KiB per device.
    assert five["all-gather"] == {"count": 5, "bytes": 5 * 64 * 64 * 4}
    assert one["all-gather"] == {"count": 1, "bytes": 64 * 64 * 4}


# XLA:TPU's text: no trip count stated (the condition's bound gives it), operands by name
# only, async collectives as -start / -done pairs, a loop inside a loop, a collective
# fused into a loop body's compute.
TPU_STYLE = """
HloModule m

%inner_cond (p: (u32[], bf16[4,8])) -> pred[] {
  %p = (u32[], bf16[4,8]{1,0}) parameter(0)
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  %constant.1 = u32[]{:T(128)} constant(3)
  ROOT %lt = pred[]{:T(512)} compare(%i, %constant.1), direction=LT
}

%async_collective_fusion.7 (w: f32[2,8]) -> f32[16,8] {
  %w = f32[2,8]{1,0} parameter(0)
  ROOT %gathered = f32[16,8]{1,0} all-gather(%w), dimensions={0}
}

%inner_body (p: (u32[], bf16[4,8])) -> (u32[], bf16[4,8]) {
  %p = (u32[], bf16[4,8]{1,0}) parameter(0)
  %x = bf16[4,8]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %f = f32[16,8]{1,0} fusion(%w0), kind=kOutput, calls=%async_collective_fusion.7
  %cp = (bf16[4,8]{1,0}, bf16[4,8]{1,0}, u32[]) collective-permute-start(%x), source_target_pairs={{0,1},{1,0}}
  %cpd = bf16[4,8]{1,0} collective-permute-done(%cp)
  ROOT %t = (u32[], bf16[4,8]{1,0}) tuple(%i, %cpd)
}

%outer_cond (q: (s32[], f32[16])) -> pred[] {
  %q = (s32[], f32[16]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %constant.2 = s32[] constant(4)
  ROOT %lt2 = pred[] compare(%j, %constant.2), direction=LT
}

%outer_body (q: (s32[], f32[16])) -> (s32[], f32[16]) {
  %q = (s32[], f32[16]{0}) parameter(0)
  %v = f32[16]{0} get-tuple-element(%q), index=1
  %ar = f32[16]{0} all-reduce(%v), replica_groups={}, to_apply=%add
  %w = (u32[], bf16[4,8]{1,0}) while(%init), condition=%inner_cond, body=%inner_body
  ROOT %t2 = (s32[], f32[16]{0}) tuple(%j, %ar)
}

ENTRY %main (a: f32[2,16]) -> f32[16] {
  %a = f32[2,16]{1,0} parameter(0)
  %ag = f32[16,16]{1,0} all-gather(%a), dimensions={0}
  %ags = (f32[2,16]{1,0}, f32[16,16]{1,0}) all-gather-start(%a), dimensions={0}
  %agd = f32[16,16]{1,0} all-gather-done(%ags)
  %loop = (s32[], f32[16]{0}) while(%init2), condition=%outer_cond, body=%outer_body
  ROOT %r = f32[16]{0} get-tuple-element(%loop), index=1
}
"""


def test_tpu_style_text_loops_async_pairs_and_named_operands():
    found = collectives(TPU_STYLE)
    # the entry's gather, sync and async (its result, the larger), and, once per entry
    # into the inner loop (4 outer trips), the gather fused into the inner loop's compute
    assert found["all-gather"] == {"count": 2 + 4, "bytes": 2 * 16 * 16 * 4 + 4 * 16 * 8 * 4}
    assert found["all-reduce"] == {"count": 4, "bytes": 4 * 16 * 4}   # 4 outer trips
    # 4 outer x 3 inner trips; the start's operand (bf16[4,8], 64 bytes), not its tuple
    assert found["collective-permute"] == {"count": 12, "bytes": 12 * 4 * 8 * 2}
    assert ici_bytes(found) == (2 * 16 * 16 * 4 + 4 * 16 * 8 * 4) + 2 * 4 * 16 * 4 + 12 * 4 * 8 * 2


# A sampler's token loop as XLA:TPU writes it: rotated (the counter compared after its
# increment), stopping early when every row is done (an all-reduce inside the condition).
ROTATED = """\
HloModule m

%cond (p: (s32[], pred[2], f32[8])) -> pred[] {
  %one = s32[]{:T(128)} constant(1)
  %n = s32[]{:T(128)} constant(6)
  %yes = pred[]{:T(512)} constant(true)
  %p = (s32[], pred[2], f32[8]) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %next = s32[]{:T(128)S(6)} add(%i, %one)
  %lt = pred[]{:T(512)S(6)} compare(%next, %n), direction=LT, metadata={op_name="lt"}
  %d = pred[2] get-tuple-element(%p), index=1
  %all = u32[] all-reduce(%d), replica_groups={}, to_apply=%and
  %no = pred[] not(%all)
  ROOT %go = pred[] and(%lt, %no)
}

%body (p: (s32[], pred[2], f32[8])) -> (s32[], pred[2], f32[8]) {
  %p = (s32[], pred[2], f32[8]) parameter(0)
  %w = f32[8]{0} get-tuple-element(%p), index=2
  %ag = f32[32]{0} all-gather(%w), dimensions={0}
  ROOT %t = (s32[], pred[2], f32[8]) tuple(%i, %d, %w)
}

ENTRY %main (a: (s32[], pred[2], f32[8])) -> (s32[], pred[2], f32[8]) {
  %a = (s32[], pred[2], f32[8]) parameter(0)
  ROOT %loop = (s32[], pred[2], f32[8]) while(%a), condition=%cond, body=%body
}
"""


def test_an_early_exit_rotated_loop_counts_up_to_its_bound():
    """The bound is the constant the counter is compared with, however the counter is
    offset; other constants in the condition (the increment, a predicate) do not confuse
    it. For a loop that may stop early it is an upper bound."""
    found = collectives(ROTATED)
    assert found["all-gather"] == {"count": 6, "bytes": 6 * 32 * 4}
    assert found["all-reduce"]["count"] == 6
