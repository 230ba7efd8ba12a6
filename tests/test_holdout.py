"""data.holdout: validation on a seeded share of the training rows, never the dev set."""

from __future__ import annotations

import pytest

pytest.importorskip("hydra")  # the GLUE app's tests need the [app] extra

from lightning_deltasam.glue.data import GlueDataModule
from lightning_deltasam.glue.tasks import glue_task
from tests.glue_data import needs_glue

pytestmark = needs_glue


def _module(**kw) -> GlueDataModule:
    import os

    task = glue_task("sst2", os.environ["GLUE_DIR"])
    dm = GlueDataModule(task, tokenizer=None, seed=kw.pop("seed", 1), **kw)
    dm.setup("fit")
    return dm


def test_holdout_splits_the_used_training_rows_and_replaces_the_dev_set():
    dm = _module(limit_train=400, holdout=0.1)
    plain = _module(limit_train=400)
    train, held = dm.train_set.indices, dm.val_sets["val"].indices
    assert len(held) == 40 and len(train) == 360 and not set(train) & set(held)
    assert sorted(train + held) == plain.train_set.indices  # the same limit_train rows, split in two
    assert list(dm.val_sets) == ["val"] and len(plain.val_sets["val"]) == 872  # the dev set is not read
    assert _module(limit_train=400, holdout=0.1).val_sets["val"].indices == held  # seeded
    assert _module(limit_train=400, holdout=0.1, seed=2).val_sets["val"].indices != held


def test_holdout_keeps_the_noisy_labels_it_trains_on():
    noisy = _module(limit_train=400, holdout=0.1, label_noise=0.3)
    flipped_plain = _module(limit_train=400, label_noise=0.3)
    assert noisy.flipped_labels == flipped_plain.flipped_labels == 120  # the same flips as without a holdout
    held = noisy.val_sets["val"]
    assert [held[i][1] for i in range(len(held))] == [flipped_plain.train_set.split.labels[j] for j in held.indices]


@pytest.mark.parametrize("share", [1.0, -0.1, 0.001])
def test_bad_holdout_is_a_clear_error(share):
    with pytest.raises(ValueError, match="data.holdout"):
        _module(limit_train=400, holdout=share)
