"""The shapes world written to disk in the public layouts reads back, through the public-layout readers,
into exactly the records the generator produced (fields and pixels), for every task."""

from __future__ import annotations

import numpy as np
import pytest

from unifier.data.readers import ReaderError, read_shapes_folder
from unifier.data.records import RECORD_TYPES, record_fields
from unifier.data.shapes import ShapesWorld
from unifier.data.shapes_writer import write_shapes
from unifier.images import load_image

N_SCENES = 20


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, "val", N_SCENES, seed=0, image_size=64, workers=1)
    return out / "val", out / "cache"


@pytest.mark.parametrize("task", list(RECORD_TYPES))
def test_written_split_reads_back_exactly(written, task):
    folder, cache = written
    records = read_shapes_folder(folder, task, cache_dir=cache)
    world = ShapesWorld("val", seed=0, image_size=64)
    expected = [record for index in range(N_SCENES) for record in world.records(task, index)]

    assert records.skipped == 0
    assert len(records) == len(expected) > 0
    assert [record_fields(r) for r in records] == [record_fields(r) for r in expected]
    rendered: dict = {}
    for got, want in zip(records, expected, strict=True):
        key = want.image_id
        if key not in rendered:  # records of one scene share its image: decode each file once
            rendered[key] = np.asarray(load_image(got.image))
            assert np.array_equal(rendered[key], want.image), f"{task}: pixels of image {key} differ"
        assert str(got.image).endswith(f"{want.image_id:06d}.png")


def test_unfinished_folder_is_refused(tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(ReaderError, match="not a finished shapes split"):
        read_shapes_folder(tmp_path / "val", "caption")
    with pytest.raises(ValueError, match="unknown task 'ocr'"):
        (tmp_path / "val" / "manifest.json").write_text("{}")
        read_shapes_folder(tmp_path / "val", "ocr")
