"""The first-difference span when one side's response starts with context tokens."""

import jax.numpy as jnp
import numpy as np

from jalign.losses.dpo import to_first_difference


def _batch(c_ids, c_mask, r_ids, r_mask):
    return {"chosen_input_ids": jnp.asarray([c_ids]), "chosen_loss_mask": jnp.asarray([c_mask]),
            "rejected_input_ids": jnp.asarray([r_ids]), "rejected_loss_mask": jnp.asarray([r_mask])}


def test_shared_prompt_forks_at_the_first_differing_token():
    out = to_first_difference(_batch([1, 5, 6, 7, 2], [0, 1, 1, 1, 1],
                                     [1, 5, 8, 7, 2], [0, 1, 1, 1, 1]))
    np.testing.assert_array_equal(out["chosen_loss_mask"][0], [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["rejected_loss_mask"][0], [0, 1, 1, 0, 0])


def test_context_tokens_do_not_count_as_the_fork():
    # chosen: a context token (mask 0, e.g. a lone space) then '7' '0' EOS; rejected: one
    # merged token then more. Both sides still score up to their first difference.
    out = to_first_difference(_batch([1, 9, 7, 0, 2], [0, 0, 1, 1, 1],
                                     [1, 4, 3, 3, 2], [0, 1, 1, 1, 1]))
    assert int(out["chosen_loss_mask"].sum()) >= 1
    np.testing.assert_array_equal(out["chosen_loss_mask"][0], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(out["rejected_loss_mask"][0], [0, 1, 1, 0, 0])
